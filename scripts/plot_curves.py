"""Training curves of one run: loss and accuracy against steps, from <workdir>/metrics.jsonl.

    python scripts/plot_curves.py workdirs/demo            # writes workdirs/demo/curves.png

Any task: the eval split is the test split for the ViT runs (accuracy is the headline)
and the validation split for language models (negative log perplexity, nats per token).
"""
from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from moe_jax.train import writers  # noqa: E402


def headline(records: list[dict]) -> str:
  """'test accuracy 89.10% at step 5000' or 'validation neg log perplexity -3.212 at ...'."""
  x, y = series(records, 'eval/neg_log_perplexity')
  if y:
    return f'validation neg log perplexity {y[-1]:.3f} at step {x[-1]}'
  x, y = series(records, 'eval/accuracy')
  return f'test accuracy {100 * y[-1]:.2f}% at step {x[-1]}' if y else ''


def read(workdir: str) -> list[dict]:
  return writers.read_jsonl(workdir)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
  pts = sorted((r['step'], r[key]) for r in records if key in r)
  return [s for s, _ in pts], [v for _, v in pts]


def plot(workdir: str, out: str) -> None:
  records = read(workdir)
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
  split = 'validation' if any('eval/neg_log_perplexity' in r for r in records) else 'test'
  for key, label, ax in [('train/loss', 'train loss (total)', ax_loss),
                         ('train/task_loss', 'train loss (task)', ax_loss),
                         ('eval/loss', f'{split} loss', ax_loss),
                         ('train/accuracy', 'train accuracy', ax_acc),
                         ('eval/accuracy', f'{split} accuracy', ax_acc)]:
    x, y = series(records, key)
    if x:   # markers for eval points, and for a series of a single point (short runs)
      ax.plot(x, y, marker='o' if key.startswith('eval') or len(x) == 1 else None, ms=4,
              label=label)
  ax_loss.set_yscale('log')
  for ax, name in [(ax_loss, 'loss'), (ax_acc, 'accuracy')]:
    ax.set_xlabel('step')
    ax.set_ylabel(name)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  title = os.path.basename(os.path.normpath(workdir))
  if headline(records):
    title += ': ' + headline(records)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('workdir')
  p.add_argument('--out', default=None, help='default <workdir>/curves.png')
  args = p.parse_args(argv)
  out = args.out or os.path.join(args.workdir, 'curves.png')
  plot(args.workdir, out)
  if headline(read(args.workdir)):
    print(headline(read(args.workdir)))
  print(f'training curves: {out}')


if __name__ == '__main__':
  main()

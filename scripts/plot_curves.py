"""Training curves of one run: loss and accuracy against steps, from <workdir>/metrics.jsonl.

    python scripts/plot_curves.py workdirs/demo            # writes workdirs/demo/curves.png
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


def read(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
  pts = sorted((r['step'], r[key]) for r in records if key in r)
  return [s for s, _ in pts], [v for _, v in pts]


def plot(workdir: str, out: str) -> None:
  records = read(workdir)
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
  for key, label, ax in [('train/loss', 'train loss (total)', ax_loss),
                         ('eval/loss', 'test loss', ax_loss),
                         ('train/accuracy', 'train accuracy', ax_acc),
                         ('eval/accuracy', 'test accuracy', ax_acc)]:
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
  x, y = series(records, 'eval/accuracy')
  title = os.path.basename(os.path.normpath(workdir))
  if y:
    title += f': test accuracy {100 * y[-1]:.2f}% at step {x[-1]}'
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
  x, y = series(read(args.workdir), 'eval/accuracy')
  if y:
    print(f'test accuracy {100 * y[-1]:.2f}% at step {x[-1]}')
  print(f'training curves: {out}')


if __name__ == '__main__':
  main()

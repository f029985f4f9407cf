"""Pareto plot: test accuracy against training FLOPs, training wall time and process CPU time.

    python scripts/plot_pareto.py experiments/results/vit_pareto_cpu.json \
        --out=experiments/plots/vit_pareto_cpu.png

Input: the summary written by `experiments/vit_pareto.py` (a JSON list of rows with
method, size, test_accuracy, train_flops, train_time_s). Each method gets one colour;
its frontier (the runs no cheaper run of the same method beats) is drawn as a line.
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    'dense': ('black', 'o', 'ViT (dense)'),
    'tokens_choice_k1': ('tab:blue', 's', 'Tokens Choice k=1'),
    'tokens_choice_k2': ('tab:cyan', 'D', 'Tokens Choice k=2'),
    'experts_choice': ('tab:green', '^', 'Experts Choice'),
    'soft_moe': ('tab:red', '*', 'Soft MoE'),
}


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """Points (cost, quality) not beaten by a cheaper-or-equal point, sorted by cost."""
  out = []
  for cost, quality in sorted(points, key=lambda p: (p[0], -p[1])):
    if not out or quality > out[-1][1]:
      out.append((cost, quality))
  return out


def plot(rows: list[dict], out: str, title: str = '') -> None:
  panels = [('train_flops', 'training FLOPs'), ('train_time_s', 'training wall time (s)')]
  # CPU seconds of the training process: a cost that load from other jobs distorts less.
  if any(r.get('process_cpu_s') for r in rows):
    panels.append(('process_cpu_s', 'process CPU time (s)'))
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), sharey=True)
  methods = sorted({r['method'] for r in rows}, key=lambda m: list(STYLE).index(m) if m in STYLE else 99)
  for ax, (key, label) in zip(axes, panels):
    for m in methods:
      color, marker, name = STYLE.get(m, ('gray', 'x', m))
      pts = [(r[key], 100 * r['test_accuracy'], r['size']) for r in rows
             if r['method'] == m and r.get(key)]
      if not pts:
        continue
      ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, s=60,
                 label=name, zorder=3)
      for x, y, size in pts:
        ax.annotate(size, (x, y), textcoords='offset points', xytext=(4, -10), fontsize=7, color=color)
      f = frontier([(x, y) for x, y, _ in pts])
      ax.plot([p[0] for p in f], [p[1] for p in f], color=color, lw=1.2, alpha=0.8)
    ax.set_xscale('log')
    ax.set_xlabel(label)
    ax.grid(True, which='both', alpha=0.3)
  axes[0].set_ylabel('test accuracy (%)')
  axes[0].legend(fontsize=8, loc='lower right')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('summary', help='JSON list of runs (experiments/vit_pareto.py writes it)')
  p.add_argument('--out', required=True, help='PNG to write')
  p.add_argument('--title', default='')
  args = p.parse_args(argv)
  with open(args.summary) as f:
    rows = json.load(f)
  if not rows:
    raise SystemExit(f'{args.summary} holds no finished runs.')
  plot(rows, args.out, args.title)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()

"""Redraws the Pareto plot of an experiment summary (the runner draws it after each run).

    python scripts/plot_pareto.py experiments/results/vit_pareto_cpu.json \
        --out=experiments/plots/vit_pareto_cpu.png

Input: the summary `python -m moe_jax.experiments.run` writes (see
`moe_jax.experiments.plots`).
"""
from __future__ import annotations

import argparse
import json

from moe_jax.experiments import plots


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('summary', help='summary JSON of moe_jax.experiments.run')
  p.add_argument('--out', required=True, help='PNG to write')
  args = p.parse_args(argv)
  with open(args.summary) as f:
    summary = json.load(f)
  if not summary.get('runs'):
    raise SystemExit(f'{args.summary} holds no finished runs.')
  plots.pareto_plot(summary, args.out)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()

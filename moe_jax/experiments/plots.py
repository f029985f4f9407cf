"""Pareto plots of an experiment summary: quality against each training cost.

One panel per cost (training FLOPs, training wall time, process CPU time); one colour
per group (method); each arm a point at its mean over seeds with error bars of one
standard deviation (quality, and time: FLOPs do not vary); each group's frontier (the
arms no cheaper arm of the same group beats) drawn as a line.
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

COSTS = {'train_flops': 'training FLOPs', 'train_time_s': 'training wall time (s)',
         'process_cpu_s': 'process CPU time (s)', 'step_time_s': 'seconds per training step'}
MARKERS = 'os^D*vP<>Xph'


def frontier(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[tuple[float, float]]:
  """Points (cost, quality) not beaten by a cheaper-or-equal point, sorted by cost."""
  sign = 1 if higher_is_better else -1
  out = []
  for cost, quality in sorted(points, key=lambda p: (p[0], -sign * p[1])):
    if not out or sign * quality > sign * out[-1][1]:
      out.append((cost, quality))
  return out


def pareto_plot(summary: dict, out: str) -> None:
  """Draws `summary['arms']` (see `run.summarize`) to the PNG `out`."""
  arms = [a for a in summary['arms'].values() if a['metric']['n']]
  costs = [c for c in summary.get('cost_axes', COSTS) if any(a[c]['n'] for a in arms)]
  metric, scale = summary['metric'], summary.get('metric_scale', 1.0)
  hib = summary.get('higher_is_better', True)
  fig, axes = plt.subplots(1, max(1, len(costs)), figsize=(5.5 * max(1, len(costs)), 4.2),
                           sharey=True, squeeze=False)
  groups = list(dict.fromkeys(a['group'] for a in arms))
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for ax, cost in zip(axes[0], costs):
    for i, g in enumerate(groups):
      color, marker = colors[i % len(colors)], MARKERS[i % len(MARKERS)]
      pts = [a for a in arms if a['group'] == g and a[cost]['n']]
      if not pts:
        continue
      xs = [a[cost]['mean'] for a in pts]
      ys = [scale * a['metric']['mean'] for a in pts]
      ax.errorbar(xs, ys, yerr=[scale * a['metric']['sd'] for a in pts],
                  xerr=[a[cost]['sd'] for a in pts], fmt=marker, color=color, ms=7, capsize=3,
                  label=g, zorder=3)
      for a, x, y in zip(pts, xs, ys):
        if a.get('label'):
          ax.annotate(a['label'], (x, y), textcoords='offset points', xytext=(4, -10),
                      fontsize=7, color=color)
      f = frontier(list(zip(xs, ys)), hib)
      ax.plot([p[0] for p in f], [p[1] for p in f], color=color, lw=1.2, alpha=0.8)
    xs_all = [a[cost]['mean'] for a in arms if a[cost]['n'] and a[cost]['mean']]
    if xs_all and max(xs_all) > 2 * min(xs_all):   # a log axis only across a factor > 2
      ax.set_xscale('log')
    ax.set_xlabel(COSTS.get(cost, cost))
    ax.grid(True, which='both', alpha=0.3)
  seeds = sorted({s for a in arms for s in a['seeds']})
  axes[0][0].set_ylabel(f"{summary.get('metric_label', metric)} (mean ± sd, seeds {seeds})")
  _finish(fig, axes, summary, out)


def _finish(fig, axes, summary: dict, out: str) -> None:
  """Legend, title, layout; writes the PNG `out` and closes the figure."""
  axes[0][0].legend(fontsize=8, loc='best')
  if summary.get('title'):
    fig.suptitle(summary['title'])
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)


def sweep_path(plot_path: str) -> str:
  """experiments/plots/x.png -> experiments/plots/x_sweep.png."""
  base, ext = os.path.splitext(plot_path)
  return f'{base}_sweep{ext or ".png"}'


def _quantity(arm: dict, key: str) -> dict | None:
  """The {mean, sd, n} of `key` in a summary arm: 'metric', a cost or a derived metric."""
  if key == 'metric':
    return arm['metric']
  if key in arm.get('derived', {}):
    return arm['derived'][key]
  return arm.get(key)


def sweep_plot(summary: dict, out: str) -> None:
  """One panel per quantity of `summary['sweep']['panels']` against each arm's `x` (e.g.
  the number of experts), one line per group, error bars of one standard deviation."""
  sweep = summary['sweep']
  panels = list(sweep.get('panels', ['metric']))
  labels = {d['name']: d.get('label', d['name']) for d in summary.get('derived', [])}
  labels.update(COSTS, metric=summary.get('metric_label', summary['metric']),
                steps_per_sec='training steps / s')
  arms = [a for a in summary['arms'].values() if a.get('x') is not None]
  groups = list(dict.fromkeys(a['group'] for a in arms))
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
  for ax, key in zip(axes[0], panels):
    scale = summary.get('metric_scale', 1.0) if key == 'metric' else 1.0
    for i, g in enumerate(groups):
      pts = sorted(((a['x'], _quantity(a, key)) for a in arms if a['group'] == g),
                   key=lambda p: p[0])
      pts = [(x, q) for x, q in pts if q and q['n']]
      if not pts:
        continue
      ax.errorbar([x for x, _ in pts], [scale * q['mean'] for _, q in pts],
                  yerr=[scale * q['sd'] for _, q in pts], fmt=MARKERS[i % len(MARKERS)] + '-',
                  color=colors[i % len(colors)], capsize=3, label=g)
    ax.set_xscale('log', base=2)
    ax.set_xlabel(sweep.get('x_label', 'x'))
    ax.set_ylabel(labels.get(key, key))
    ax.grid(True, which='both', alpha=0.3)
  _finish(fig, axes, summary, out)

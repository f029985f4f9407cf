"""Expert load over training: a heat map (steps x experts) per MoE layer, with the
dropped fraction beneath, from a run's metrics.jsonl.

    records = writers.read_jsonl(workdir)
    history = load_history(records, 'train')   # {layer: LoadHistory}
    pic = load_picture(records, 'train')       # Picture 'load_train', or None

Colour is load x E: 1 is a balanced expert, 0 a dead one, E an expert that takes every
token (collapse). The trainer logs the vectors as 'train/routing/<layer>/expert_load'
(the mean over each logging window) and 'eval/routing/<layer>/expert_load'.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from matplotlib.ticker import MaxNLocator

from moe_jax.inspection.pictures import Picture, figure_rgb, layer_order, plt

SUFFIX = '/expert_load'


@dataclasses.dataclass
class LoadHistory:
  steps: np.ndarray            # [T]
  load: np.ndarray             # [T, E], each row sums to 1
  dropped_steps: np.ndarray    # [T']
  dropped: np.ndarray          # [T'] dropped fraction


def load_history(records: list[dict], split: str = 'train') -> dict[str, LoadHistory]:
  """{layer: LoadHistory} from metrics.jsonl records."""
  prefix = f'{split}/routing/'
  loads: dict[str, dict[int, list]] = {}
  dropped: dict[str, dict[int, float]] = {}
  for r in records:
    for k, v in r.items():
      if not k.startswith(prefix):
        continue
      if k.endswith(SUFFIX) and isinstance(v, list):
        loads.setdefault(k[len(prefix):-len(SUFFIX)], {})[r['step']] = v
      elif k.endswith('/dropped_fraction'):
        dropped.setdefault(k[len(prefix):-len('/dropped_fraction')], {})[r['step']] = v
  out = {}
  for layer, by_step in loads.items():
    steps = sorted(by_step)
    d = dropped.get(layer, {})
    out[layer] = LoadHistory(np.asarray(steps), np.asarray([by_step[s] for s in steps], float),
                             np.asarray(sorted(d)), np.asarray([d[s] for s in sorted(d)], float))
  return out


def _edges(steps: np.ndarray) -> np.ndarray:
  """Cell edges around each step (midpoints between steps)."""
  if len(steps) == 1:
    return np.asarray([steps[0] - 0.5, steps[0] + 0.5])
  mid = (steps[1:] + steps[:-1]) / 2
  return np.concatenate([[2 * steps[0] - mid[0]], mid, [2 * steps[-1] - mid[-1]]])


def load_picture(records: list[dict], split: str = 'train', *, title: str = '',
                 max_columns: int = 3) -> Picture | None:
  """The heat map of every layer's load (one panel per layer), or None without vectors."""
  history = load_history(records, split)
  if not history:
    return None
  names = layer_order(history)
  cols = min(len(names), max_columns)
  rows = math.ceil(len(names) / cols)
  fig = plt.figure(figsize=(4.2 * cols, 3.4 * rows + 0.3), dpi=90)
  grid = fig.add_gridspec(2 * rows, cols, height_ratios=[3, 1] * rows, hspace=0.55, wspace=0.35,
                          top=1 - 0.55 / (3.4 * rows + 0.3), bottom=0.5 / (3.4 * rows + 0.3),
                          left=0.1 / cols, right=0.86)
  vmax = max(2.0, max(float(np.max(h.load)) * h.load.shape[1] for h in history.values()))
  mesh = None
  for i, name in enumerate(names):
    h = history[name]
    r, c = divmod(i, cols)
    ax = fig.add_subplot(grid[2 * r, c])
    e = h.load.shape[1]
    mesh = ax.pcolormesh(_edges(h.steps.astype(float)), np.arange(e + 1) - 0.5, (h.load * e).T,
                         cmap='magma', vmin=0.0, vmax=vmax, shading='flat')
    ax.set_title(f'{name}: load x E', fontsize=9)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.set_ylabel('expert', fontsize=8)
    ax.tick_params(labelsize=7, labelbottom=False)
    below = fig.add_subplot(grid[2 * r + 1, c], sharex=ax)
    if len(h.dropped):
      below.plot(h.dropped_steps, h.dropped, color='tab:red', lw=1.2,
                 marker='o' if len(h.dropped) < 3 else None, ms=3)
    below.set_ylim(0, max(0.05, 1.1 * float(np.max(h.dropped, initial=0.0))))
    below.set_ylabel('dropped', fontsize=8)
    below.set_xlabel('step', fontsize=8)
    below.tick_params(labelsize=7)
    below.grid(True, alpha=0.3)
  bar = fig.add_axes((0.89, 0.3, 0.015, 0.5))
  fig.colorbar(mesh, cax=bar).ax.tick_params(labelsize=7)
  fig.suptitle(title or f'expert load ({split}); 1 = balanced, 0 = dead expert', fontsize=10)
  return Picture(f'load_{split}', png=figure_rgb(fig))

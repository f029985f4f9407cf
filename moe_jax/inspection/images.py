"""Routing pictures of a ViT: where each patch went.

    pics = image_pictures(images, views, patch_size=7, class_token=False)
      'patch_experts'        rows: the image, then each MoE layer with every patch
                             coloured by its expert (largest combine weight among the
                             experts that took it); x: a requested choice was dropped;
                             uncoloured: no expert took the patch
      '<layer>/soft_slots'   Soft MoE (dense) layers: a few slots' dispatch weights over
                             the image (Puigcerver et al. 2023, Fig. 10; each panel from
                             its smallest to its largest weight), and per patch
                             its largest combine weight (1: one slot makes its output)

`images` [B, H, W, C] in any value range (shown min-max scaled); `views` from
`inspection.views` ({layer: view}, arrays [B, S, ...]).
"""
from __future__ import annotations

import numpy as np
from matplotlib.colors import LogNorm

from moe_jax.inspection.pictures import (DROPPED_COLOR, UNROUTED_COLOR, Picture, expert_colors,
                                         expert_legend, figure_rgb, layer_order, plt)
from moe_jax.inspection.views import top_expert


def _display(image: np.ndarray) -> np.ndarray:
  """[H, W, C] -> [H, W, 3] in [0, 1] (grey images as RGB)."""
  x = np.asarray(image, np.float32)
  lo, hi = float(x.min()), float(x.max())
  x = (x - lo) / (hi - lo if hi > lo else 1.0)
  return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]


def _grid(image_shape, patch_size: int) -> tuple[int, int]:
  return image_shape[0] // patch_size, image_shape[1] // patch_size


def _patches(a: np.ndarray, grid: tuple[int, int], class_token: bool) -> np.ndarray:
  """[S, ...] per token -> [gh, gw, ...] per patch (the class token left out)."""
  a = a[1:] if class_token else a
  return a.reshape(*grid, *a.shape[1:])


def _show(ax, image: np.ndarray, patch_size: int) -> None:
  h, w = image.shape[:2]
  ax.imshow(image, extent=(0, w, h, 0), interpolation='nearest')
  ax.set_xticks(np.arange(0, w + 1, patch_size))
  ax.set_yticks(np.arange(0, h + 1, patch_size))
  ax.grid(True, color='white', lw=0.3, alpha=0.6)
  ax.tick_params(length=0, labelbottom=False, labelleft=False)
  ax.set_xlim(0, w)
  ax.set_ylim(h, 0)


def expert_picture(images: np.ndarray, views: dict, *, patch_size: int,
                   class_token: bool = False, alpha: float = 0.6) -> Picture:
  """'patch_experts': the images (columns) and every MoE layer's patch colours (rows)."""
  n = len(images)
  names = layer_order(views)
  num_experts = max(v['weight'].shape[-1] for v in views.values())
  colors = expert_colors(num_experts)
  grid = _grid(images.shape[1:], patch_size)
  fig, axes = plt.subplots(1 + len(names), n, figsize=(1.6 * n + 0.6, 1.6 * (1 + len(names)) + 0.5),
                           dpi=90, squeeze=False)
  for b in range(n):
    image = _display(images[b])
    _show(axes[0, b], image, patch_size)
    for row, name in enumerate(names, 1):
      view = {k: v[b] for k, v in views[name].items()}
      top = _patches(top_expert({k: v[None] for k, v in view.items()})[0], grid, class_token)
      overlay = np.zeros((*grid, 4))
      overlay[..., :3] = colors[np.maximum(top, 0)]
      overlay[..., 3] = np.where(top >= 0, alpha, 0.0)
      ax = axes[row, b]
      _show(ax, 0.35 + 0.65 * image, patch_size)
      ax.imshow(overlay, extent=(0, grid[1] * patch_size, grid[0] * patch_size, 0),
                interpolation='nearest')
      lost = _patches(view['dropped'], grid, class_token) > 0
      ys, xs = np.nonzero(lost)
      ax.plot((xs + 0.5) * patch_size, (ys + 0.5) * patch_size, 'x', color=DROPPED_COLOR,
              ms=max(3, 40 / max(grid)), mew=1.5)
      if b == 0:
        ax.set_ylabel(name, fontsize=7)
  axes[0, 0].set_ylabel('image', fontsize=7)
  expert_legend(fig, colors, extra=[('no expert', UNROUTED_COLOR, None),
                                    ('dropped choice', DROPPED_COLOR, 'x')])
  fig.suptitle('patches coloured by expert (largest combine weight)', fontsize=9)
  fig.tight_layout(rect=(0, 0.1, 1, 0.96))
  return Picture('patch_experts', png=figure_rgb(fig))


def soft_slot_picture(images: np.ndarray, name: str, view: dict, *, patch_size: int,
                      class_token: bool = False, num_slots: int = 6) -> Picture:
  """'<layer>/soft_slots': rows = images; columns = the image, `num_slots` slots' dispatch
  weights (each panel scaled to its own maximum), the largest combine weight per patch."""
  n = len(images)
  total = view['slot_dispatch'].shape[-1]
  per_expert = total // view['weight'].shape[-1]
  slots = np.unique(np.linspace(0, total - 1, min(num_slots, total)).round().astype(int))
  grid = _grid(images.shape[1:], patch_size)
  cols = 2 + len(slots)
  fig, axes = plt.subplots(n, cols, figsize=(1.45 * cols, 1.5 * n + 0.5), dpi=90, squeeze=False)
  extent = (0, grid[1] * patch_size, grid[0] * patch_size, 0)
  num_tokens = view['slot_dispatch'].shape[1]
  for b in range(n):
    image = _display(images[b])
    _show(axes[b, 0], image, patch_size)
    for j, slot in enumerate(slots, 1):
      heat = _patches(view['slot_dispatch'][b, :, slot], grid, class_token)
      ax = axes[b, j]
      _show(ax, 0.4 * image, patch_size)
      ax.imshow(heat, extent=extent, cmap='inferno', alpha=0.85, vmin=float(heat.min()),
                vmax=max(float(heat.max()), float(heat.min()) + 1e-9), interpolation='nearest')
      ax.text(0.03, 0.04, f'max {num_tokens * float(heat.max()):.1f}/S', color='white',
              fontsize=6, transform=ax.transAxes)
      if b == 0:
        ax.set_title(f'slot {slot} (e{slot // per_expert})', fontsize=7)
    concentration = _patches(view['slot_combine'][b].max(-1), grid, class_token)
    ax = axes[b, -1]
    _show(ax, 0.4 * image, patch_size)
    im = ax.imshow(concentration, extent=extent, cmap='viridis', alpha=0.9, interpolation='nearest',
                   norm=LogNorm(vmin=1.0 / total, vmax=1.0))
    if b == 0:
      ax.set_title('max combine', fontsize=7)
  fig.subplots_adjust(left=0.02, right=0.9, bottom=0.02, top=0.86, wspace=0.08, hspace=0.08)
  bar = fig.add_axes((0.92, 0.1, 0.015, 0.7))
  fig.colorbar(im, cax=bar).ax.tick_params(labelsize=6)
  bar.set_ylabel(f'largest combine weight (1/{total}: even over all slots)', fontsize=6)
  fig.suptitle(f'{name}: each slot\'s dispatch weights over the image (each panel from its '
               'smallest to its largest weight;\nS = tokens, 1/S = uniform); per patch, its '
               'largest combine weight', fontsize=8)
  return Picture(f'{name}/soft_slots', png=figure_rgb(fig))


def image_pictures(images: np.ndarray, views: dict, *, patch_size: int,
                   class_token: bool = False) -> list[Picture]:
  """Every picture of the module docstring for these images."""
  if not views:
    return []
  pics = [expert_picture(images, views, patch_size=patch_size, class_token=class_token)]
  for name in layer_order(views):
    if 'slot_dispatch' in views[name]:
      pics.append(soft_slot_picture(images, name, views[name], patch_size=patch_size,
                                    class_token=class_token))
  return pics

"""What every routing picture shares: the `Picture` record, expert colours, rendering.

    pic = Picture('block_03/experts', png=figure_rgb(fig))      # [H, W, 3] uint8
    pic.write('out/')           # out/block_03.experts.png (+ .html / .md when present)
    colors = expert_colors(8)   # [E, 3] floats in [0, 1], the same in every picture
"""
from __future__ import annotations

import dataclasses
import html
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

UNROUTED_COLOR = (0.82, 0.82, 0.82)
DROPPED_COLOR = (0.85, 0.1, 0.1)


@dataclasses.dataclass
class Picture:
  """One picture: a PNG image and, for text, the same as HTML and a markdown table.

  Attributes:
    name: 'block_03/experts'; the TensorBoard tag under 'routing/', and the file stem
      with '/' as '.'.
    png: [H, W, 3] uint8, or None.
    html: an HTML fragment (no <html> wrapper), or None.
    markdown: a markdown table, or None.
  """
  name: str
  png: np.ndarray | None = None
  html: str | None = None
  markdown: str | None = None

  @property
  def stem(self) -> str:
    return self.name.replace('/', '.')

  def write(self, out_dir: str) -> list[str]:
    """Writes <stem>.png / .html / .md into out_dir; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    if self.png is not None:
      paths.append(os.path.join(out_dir, self.stem + '.png'))
      plt.imsave(paths[-1], self.png)
    if self.html is not None:
      paths.append(os.path.join(out_dir, self.stem + '.html'))
      with open(paths[-1], 'w') as f:
        f.write(html_page(self.name, self.html))
    if self.markdown is not None:
      paths.append(os.path.join(out_dir, self.stem + '.md'))
      with open(paths[-1], 'w') as f:
        f.write(self.markdown)
    return paths


def layer_order(names) -> list[str]:
  """Layer names in model order: un-prefixed ('block_03'), then 'encoder/...', then
  'decoder/...', by block number within a stack (jitted outputs come back sorted by
  name, which puts the decoder first)."""
  rank = {'encoder': 1, 'decoder': 2}
  return sorted(names, key=lambda n: (rank.get(n.split('/')[0], 0) if '/' in n else 0, n))


def html_page(title: str, body: str) -> str:
  return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}'
          f'</title></head>\n<body style="font-family: sans-serif">\n{body}\n</body></html>\n')


def expert_colors(num_experts: int) -> np.ndarray:
  """[E, 3] RGB in [0, 1], the same in every picture: tab10 / tab20 without their greys
  (grey means "no expert") for up to 18 experts, then evenly spaced hues at alternating
  lightness (neighbouring experts stay distinguishable)."""
  for name, greys in (('tab10', {7}), ('tab20', {14, 15})):
    palette = [c for i, c in enumerate(plt.get_cmap(name).colors) if i not in greys]
    if num_experts <= len(palette):
      return np.asarray(palette[:num_experts])
  hues = np.arange(num_experts) / num_experts
  light = np.where(np.arange(num_experts) % 2, 0.42, 0.62)
  return np.stack([_hls_to_rgb(h, l, 0.75) for h, l in zip(hues, light)])


def _hls_to_rgb(h: float, l: float, s: float) -> np.ndarray:
  import colorsys
  return np.asarray(colorsys.hls_to_rgb(h, l, s))


def hex_color(rgb) -> str:
  return '#' + ''.join(f'{int(round(255 * float(c))):02x}' for c in rgb[:3])


def figure_rgb(fig) -> np.ndarray:
  """Renders a matplotlib figure and closes it: [H, W, 3] uint8."""
  fig.canvas.draw()
  rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return rgb


def expert_legend(fig, colors: np.ndarray, *, extra: list[tuple[str, tuple, str]] = (),
                  height: float = 0.05) -> None:
  """Along the bottom of `fig`: a strip of the expert colours (ticks at up to 16 experts)
  and a legend of the `extra` (label, colour, marker or None) entries beside it."""
  from matplotlib.lines import Line2D
  from matplotlib.patches import Patch
  e = len(colors)
  ax = fig.add_axes((0.08, 0.03, 0.5, height * 0.5))
  ax.imshow(np.asarray(colors)[None], aspect='auto', extent=(-0.5, e - 0.5, 0, 1))
  ticks = np.arange(e) if e <= 16 else np.linspace(0, e - 1, 9).round().astype(int)
  ax.set_xticks(ticks, [f'e{i}' for i in ticks], fontsize=6)
  ax.set_yticks([])
  ax.tick_params(length=2, pad=1)
  ax.set_title('expert', fontsize=7, pad=2)
  handles = [Line2D([], [], color=color, marker=marker, linestyle='', label=label) if marker
             else Patch(color=color, label=label) for label, color, marker in extra]
  if handles:
    fig.legend(handles=handles, loc='lower left', bbox_to_anchor=(0.62, 0.0), fontsize=7,
               frameon=False, ncol=len(handles), handlelength=1.0)

"""Routing pictures of a language model: tokens coloured by expert, and each expert's
most frequent tokens.

    pics = text_pictures({'decoder': (ids, valid)}, views, piece=tokenizer.piece,
                         num_examples=2)
      '<layer>/tokens'       the first examples' tokens, each on its expert's colour
                             (largest combine weight among the experts that took it);
                             grey: no expert took it; red underline: a requested choice
                             was dropped. PNG and HTML (hover: expert, weight, drops).
      '<layer>/top_tokens'   per expert, the share of tokens it takes (as its colour) and
                             the tokens it takes most often, over every row given. PNG,
                             markdown and HTML.

`stacks` maps a stack name (the part of the layer name before '/': 'encoder',
'decoder'; layers without one use the first stack) to (token ids [B, S], valid [B, S]
bool) of the tokens its MoE layers saw; `views` from `inspection.views`.
"""
from __future__ import annotations

import collections
import html
import re
from typing import Callable

import numpy as np

from moe_jax.inspection.pictures import (DROPPED_COLOR, UNROUTED_COLOR, Picture, expert_colors,
                                         figure_rgb, hex_color, layer_order, plt)
from moe_jax.inspection.views import top_expert

FONT = 'DejaVu Sans Mono'        # ships with matplotlib; monospace keeps the boxes aligned
CHAR_WIDTH = 0.602               # its advance width, in em
_BYTE = re.compile(r'^<0x([0-9A-Fa-f]{2})>$')


def display_piece(piece: str) -> str:
  """A SentencePiece piece as shown: '▁' as a space, byte pieces as their character
  (newline '↵', other control bytes '·')."""
  m = _BYTE.match(piece)
  if m:
    c = chr(int(m.group(1), 16))
    return '↵' if c == '\n' else (c if c.isprintable() else '·')
  return piece.replace('\u2581', ' ')


def _tint(rgb, amount: float = 0.45) -> np.ndarray:
  """The colour mixed with white (text stays readable on it)."""
  return 1.0 - (1.0 - np.asarray(rgb[:3], float)) * (1.0 - amount)


def _stack(layer: str, stacks: dict) -> str:
  head = layer.split('/', 1)[0]
  return head if '/' in layer and head in stacks else next(iter(stacks))


# ----------------------------------------------------------------------------- rendering
def _wrap(segments: list[tuple[str, object, bool]], width: int) -> list[list]:
  lines, line, used = [], [], 0
  for text, color, mark in segments:
    text = text[:width]
    if used + len(text) > width and line:
      lines.append(line)
      line, used = [], 0
    line.append((text, color, mark))
    used += len(text)
  if line:
    lines.append(line)
  return lines


def strip_figure(lines: list[list[tuple[str, object, bool]]], *, title: str = '',
                 width: int = 96, fontsize: float = 8.0) -> np.ndarray:
  """Monospace lines of (text, background colour or None, underline) segments -> RGB."""
  char_in = fontsize / 72 * CHAR_WIDTH
  line_in = fontsize / 72 * 1.7
  rows = len(lines) + (1 if title else 0)
  fig = plt.figure(figsize=((width + 2) * char_in, max(rows, 1) * line_in + 0.1), dpi=110)
  ax = fig.add_axes((0, 0, 1, 1))
  ax.set_xlim(-1, width + 1)
  ax.set_ylim(rows + 0.1, 0)
  ax.axis('off')
  y0 = 0
  if title:
    ax.text(0, 0.55, title, fontsize=fontsize, family='sans-serif', weight='bold', va='center',
            parse_math=False)
    y0 = 1
  for i, line in enumerate(lines):
    y, x = y0 + i, 0
    boxes, colors, marks = [], [], []
    for text, color, mark in line:
      if color is not None:      # a hairline gap shows where tokens meet
        boxes.append((x + 0.04, len(text) - 0.08))
        colors.append(color)
      if mark:
        marks.append((x, x + len(text)))
      x += len(text)
    if boxes:
      ax.broken_barh(boxes, (y + 0.1, 0.8), facecolors=colors)
    for a, b in marks:
      ax.plot([a, b], [y + 0.92, y + 0.92], color=DROPPED_COLOR, lw=1.6, solid_capstyle='butt')
    ax.text(0, y + 0.52, ''.join(t for t, _, _ in line), family=FONT, fontsize=fontsize,
            va='center', ha='left', parse_math=False)
  return figure_rgb(fig)


# ----------------------------------------------------------------------------- pictures
def _token_segments(ids, valid, view, piece, colors, max_tokens):
  top = top_expert({k: v[None] for k, v in view.items()})[0]
  segs = []
  for s in np.nonzero(valid)[0][:max_tokens]:
    e = int(top[s])
    color = _tint(colors[e]) if e >= 0 else UNROUTED_COLOR
    w = float(view['weight'][s, e]) if e >= 0 else 0.0
    segs.append((display_piece(piece(int(ids[s]))), color, view['dropped'][s] > 0, e, w,
                 int(view['dropped'][s])))
  return segs


def tokens_picture(layer: str, ids: np.ndarray, valid: np.ndarray, view: dict,
                   piece: Callable[[int], str], *, num_examples: int, max_tokens: int = 160,
                   width: int = 96) -> Picture:
  """'<layer>/tokens' for the first `num_examples` rows (PNG and HTML)."""
  colors = expert_colors(view['weight'].shape[-1])
  lines, parts = [], []
  legend = ''.join(f'<span style="background:{hex_color(_tint(c))};padding:0 4px">e{i}</span> '
                   for i, c in enumerate(colors))
  parts.append(f'<h3>{html.escape(layer)}: tokens coloured by expert</h3><p>{legend}'
               '<span style="background:#d1d1d1">no expert</span> '
               '<span style="border-bottom:2px solid #d91a1a">a choice dropped</span></p>')
  for b in range(min(num_examples, len(ids))):
    segs = _token_segments(ids[b], valid[b], {k: v[b] for k, v in view.items()}, piece, colors,
                           max_tokens)
    lines.append([(f'example {b}', None, False)])
    lines += _wrap([(t, c, m) for t, c, m, *_ in segs], width)
    spans = []
    for text, color, mark, e, w, drops in segs:
      tip = (f'expert {e}, weight {w:.3f}' if e >= 0 else 'no expert') + (
          f', {drops} choice(s) dropped' if drops else '')
      style = f'background:{hex_color(color)};border-right:1px solid white' + (';border-bottom:2px solid #d91a1a' if mark else '')
      spans.append(f'<span style="{style}" title="{html.escape(tip)}">'
                   f'{html.escape(text)}</span>')
    parts.append(f'<p style="font-family:monospace;white-space:pre-wrap;line-height:1.6">'
                 f'<b>example {b}</b><br>{"".join(spans)}</p>')
  png = strip_figure(lines, title=f'{layer}: tokens coloured by expert (grey: no expert, '
                     'red underline: a choice dropped)', width=width)
  return Picture(f'{layer}/tokens', png=png, html='\n'.join(parts))


def top_tokens(ids: np.ndarray, valid: np.ndarray, view: dict, top: int = 8):
  """Per expert: (tokens it took, [(token id, count), ...] most frequent first), counting
  each token once, at the expert it is coloured with."""
  experts = top_expert(view)
  counts = [collections.Counter() for _ in range(view['weight'].shape[-1])]
  for e, i in zip(experts[valid], ids[valid]):
    if e >= 0:
      counts[int(e)][int(i)] += 1
  return [(sum(c.values()), c.most_common(top)) for c in counts]


def top_tokens_picture(layer: str, ids: np.ndarray, valid: np.ndarray, view: dict,
                       piece: Callable[[int], str], *, top: int = 8, width: int = 96) -> Picture:
  """'<layer>/top_tokens': PNG, markdown and HTML tables."""
  table = top_tokens(ids, valid, view, top)
  colors = expert_colors(len(table))
  total = max(sum(n for n, _ in table), 1)
  show = lambda i: display_piece(piece(i)).replace(' ', '␣') or '∅'
  md = [f'{layer}: the tokens each expert takes most often ({total} tokens)', '',
        '| expert | share | most frequent tokens (count) |', '|---|---|---|']
  rows_html, lines = [], []
  for e, (n, common) in enumerate(table):
    words = ', '.join(f'{show(i)} {c}' for i, c in common)
    md.append(f'| e{e} | {100 * n / total:.1f}% | '
              + ', '.join(f'`{show(i).replace("`", "ˋ").replace("|", "¦")}` {c}'
                          for i, c in common) + ' |')
    rows_html.append(f'<tr><td style="background:{hex_color(_tint(colors[e]))}">e{e}</td>'
                     f'<td>{100 * n / total:.1f}%</td><td style="font-family:monospace">'
                     f'{html.escape(words)}</td></tr>')
    lines.append([(f'e{e:<3d}', _tint(colors[e]), False),
                  (f' {100 * n / total:5.1f}%  {words}'[:width - 5], None, False)])
  page = (f'<h3>{html.escape(layer)}: the tokens each expert takes most often</h3>'
          '<table border="1" style="border-collapse:collapse"><tr><th>expert</th><th>share'
          '</th><th>most frequent tokens (count)</th></tr>' + ''.join(rows_html) + '</table>')
  png = strip_figure(lines, title=f'{layer}: tokens each expert takes most often '
                     f'(share of {total} tokens; ␣ = space)', width=width)
  return Picture(f'{layer}/top_tokens', png=png, markdown='\n'.join(md) + '\n', html=page)


def text_pictures(stacks: dict[str, tuple[np.ndarray, np.ndarray]], views: dict,
                  piece: Callable[[int], str], *, num_examples: int) -> list[Picture]:
  """Every picture of the module docstring, two per MoE layer."""
  pics = []
  for layer in layer_order(views):
    view = views[layer]
    ids, valid = stacks[_stack(layer, stacks)]
    pics.append(tokens_picture(layer, ids, valid, view, piece, num_examples=num_examples))
    pics.append(top_tokens_picture(layer, ids, valid, view, piece))
  return pics

"""Which blocks of a stack are MoE layers (V-MoE / Soft MoE placement options).

    moe_block_indices(12, every=2)             -> (1, 3, 5, 7, 9, 11)   V-MoE "every 2"
    moe_block_indices(12, last_n=6)            -> (6, 7, 8, 9, 10, 11)  Soft MoE "last half"
    moe_block_indices(12, last_n=6, every=2)   -> (7, 9, 11)            V-MoE "last 5, every 2" style
    moe_block_indices(12, layers=(3, 11))      -> (3, 11)               explicit

Blocks are numbered from 0. `every=k` keeps the blocks `i` with `(i + 1) % k == 0`, so
the last block is an MoE block whenever k divides the depth (as in V-MoE).
"""
from __future__ import annotations

from typing import Sequence

from moe_jax.errors import ConfigError


def moe_block_indices(depth: int, *, every: int | None = None, last_n: int | None = None,
                      layers: Sequence[int] | None = None) -> tuple[int, ...]:
  """Indices of the MoE blocks among `depth` blocks.

  Args:
    depth: number of blocks.
    every: keep every k-th block (None: all candidates).
    last_n: candidates are the last n blocks (None: all blocks).
    layers: explicit block indices; exclusive with `every` and `last_n`.

  Returns:
    A sorted tuple of block indices (empty: a dense model).
  """
  if layers is not None:
    if every is not None or last_n is not None:
      raise ValueError('give MoE placement either as `layers` or as `every`/`last_n`, not both.')
    out = tuple(sorted({int(i) for i in layers}))
    bad = [i for i in out if not 0 <= i < depth]
    if bad:
      raise ValueError(f'MoE layers {bad} are outside the {depth} blocks (numbered 0..{depth - 1}).')
    return out
  if every is not None and every < 1:
    raise ValueError(f'moe every={every} must be >= 1.')
  if last_n is not None and not 0 <= last_n <= depth:
    raise ValueError(f'moe last_n={last_n} must be between 0 and the depth {depth}.')
  first = 0 if last_n is None else depth - last_n
  return tuple(i for i in range(first, depth) if every is None or (i + 1) % every == 0)


def stack_moe_blocks(depth: int, moe, *, field: str = 'moe') -> tuple[int, ...]:
  """The MoE blocks of a stack of `depth` blocks for a `MoeConfig` (None: none).

  A stack's MoE config must say where its layers go: no placement at all (rather than
  silently every block) is a ConfigError naming `field`.
  """
  if moe is None:
    return ()
  placement = moe.placement()
  if all(v is None for v in placement.values()):
    raise ConfigError(f'give a placement (every, last_n or layers) for the {moe.router!r} MoE '
                      "layers, or set router='dense'.", field=field)
  try:
    return moe_block_indices(depth, **placement)
  except ValueError as e:
    raise ConfigError(str(e), field=field) from None

"""Expert capacity: how many slots each expert has per routing group.

Codebases disagree (see `notes/routing-reference.md` §0). Our default follows
**vmoe / V-MoE / the Soft MoE paper** with `multiple_of=1`:

    C = ceil(k * S * capacity_factor / E)

so `capacity_factor=1` with top-k gives exactly enough slots for k·S assignments at
perfect balance. The other conventions are options:

* flaxformer / T5X / ST-MoE: `include_k=False, rounding='round', min_capacity=4`;
* mesh-tensorflow / Switch: `include_k=False, rounding='floor', min_capacity=4`;
* vmoe default: `rounding='ceil', multiple_of=4`;
* Megatron: `rounding='ceil', include_k=False`.

The result is clipped to `[max(min_capacity, 1), S]`: no expert can take more than the
S tokens of a group (a token never picks the same expert twice).
"""
from __future__ import annotations

import math

ROUNDINGS = ('ceil', 'round', 'floor')


def compute_capacity(num_tokens: int, num_experts: int, capacity_factor: float, *,
                     k: int = 1, include_k: bool = True, rounding: str = 'ceil',
                     multiple_of: int = 1, min_capacity: int = 1) -> int:
  """Slots per expert per group.

  Args:
    num_tokens: S, tokens per routing group.
    num_experts: E.
    capacity_factor: slots per (k·)token at perfect balance; must be > 0.
    k: experts per token (token choice) — multiplied in when `include_k`.
    include_k: vmoe convention (True) or flaxformer / mesh-tf convention (False).
    rounding: 'ceil' (vmoe), 'round' (flaxformer), 'floor' (mesh-tf).
    multiple_of: round C up to a multiple of this (vmoe uses 4 on TPU).
    min_capacity: lower bound on C (flaxformer and mesh-tf use 4).

  Returns:
    C, an int in [1, S].
  """
  if capacity_factor is None or capacity_factor <= 0:
    raise ValueError(f'capacity_factor must be > 0, got {capacity_factor!r}; '
                     'use the dropless engine for routing without capacity.')
  if rounding not in ROUNDINGS:
    raise ValueError(f'rounding must be one of {ROUNDINGS}, got {rounding!r}.')
  if multiple_of < 1:
    raise ValueError(f'multiple_of must be >= 1, got {multiple_of}.')
  raw = (k if include_k else 1) * num_tokens * capacity_factor / num_experts
  # Guard against float noise such as 1.25 * 8 / 4 = 2.5000000000000004 -> ceil 3.
  raw = round(raw, 9)
  c = {'ceil': math.ceil, 'round': lambda v: int(round(v)), 'floor': math.floor}[rounding](raw)
  c = -(-c // multiple_of) * multiple_of
  c = max(c, min_capacity, 1)
  return int(min(c, num_tokens))

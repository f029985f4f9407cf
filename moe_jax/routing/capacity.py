"""Expert capacity: how many slots each expert has per routing group.

Codebases disagree on C. Our default follows **vmoe / V-MoE / the Soft MoE paper**
with `multiple_of=1`:

    C = ceil(k * S * capacity_factor / E)

so `capacity_factor=1` with top-k gives exactly enough slots for k·S assignments at
perfect balance. The other codebases' conventions are options (checked by hand in
`tests/routing/test_capacity.py`):

| codebase | options | top-2, S=64, E=8, cf=1.25 |
|---|---|---|
| ours / vmoe (default) | `rounding='ceil'` | 20 |
| vmoe on TPU | `multiple_of=4` | 20 |
| flaxformer / T5X / ST-MoE | `include_k=False, rounding='round', min_capacity=4` | 10 |
| mesh-tensorflow / Switch | `include_k=False, rounding='floor', min_capacity=4` | 10 |
| Megatron | `include_k=False` (ceil) | 10 |

The result is clipped to `[max(min_capacity, 1), S]`: no expert can take more than the
S tokens of a group (a token never picks the same expert twice).

A router module holds its train and eval capacity as one `CapacitySpec`, parsed from
the flat keywords configs pass (`capacity_factor=1.25, eval_capacity_factor=2.0`).
"""
from __future__ import annotations

import dataclasses
import math

from moe_jax.errors import ConfigError

ROUNDINGS = ('ceil', 'round', 'floor')
# The flat keywords a `CapacitySpec` is made of (routers' `router_kwargs` use these names).
CAPACITY_KWARGS = ('capacity_factor', 'eval_capacity_factor', 'capacity', 'eval_capacity',
                   'capacity_include_k', 'capacity_rounding', 'capacity_multiple_of',
                   'min_capacity')
# Those that shape the evaluation capacity only (routers without a training capacity).
EVAL_CAPACITY_KWARGS = tuple(n for n in CAPACITY_KWARGS if n not in ('capacity_factor',
                                                                      'capacity'))


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


@dataclasses.dataclass(frozen=True)
class CapacitySpec:
  """Train and eval capacity of a router: the flat keywords, validated once.

  Attributes:
    capacity_factor: training C from `compute_capacity`; None: C = S (nothing dropped).
    eval_capacity_factor: the same at evaluation; None: as in training.
    capacity: explicit training C in [1, S], overrides the factor.
    eval_capacity: explicit evaluation C; None: as in training.
    capacity_include_k, capacity_rounding, capacity_multiple_of, min_capacity: the
      convention (`compute_capacity`'s include_k, rounding, multiple_of, min_capacity).
  """
  capacity_factor: float | None = None
  eval_capacity_factor: float | None = None
  capacity: int | None = None
  eval_capacity: int | None = None
  capacity_include_k: bool = True
  capacity_rounding: str = 'ceil'
  capacity_multiple_of: int = 1
  min_capacity: int = 1

  def __post_init__(self):
    for name in ('capacity_factor', 'eval_capacity_factor'):
      v = getattr(self, name)
      if v is not None and not v > 0:
        raise ConfigError(f'must be > 0, got {v!r}.', field=name)
    for name in ('capacity', 'eval_capacity'):
      v = getattr(self, name)
      if v is not None and not (isinstance(v, int) and v >= 1):
        raise ConfigError(f'must be an int >= 1, got {v!r}.', field=name)
    if self.capacity_rounding not in ROUNDINGS:
      raise ConfigError(f'must be one of {ROUNDINGS}, got {self.capacity_rounding!r}.',
                        field='capacity_rounding')
    if not self.capacity_multiple_of >= 1:
      raise ConfigError(f'must be >= 1, got {self.capacity_multiple_of!r}.',
                        field='capacity_multiple_of')

  def slots(self, num_tokens: int, num_experts: int, *, k: int = 1, train: bool = True) -> int:
    """C for groups of `num_tokens` tokens in training (`train`) or evaluation.

    An explicit capacity wins, then the factor; with neither, C = S: every expert can
    take every token of its group, so nothing is dropped (routers whose paper has no
    capacity, e.g. Shazeer 2017 and DeepSeek, default to this).
    """
    explicit = self.capacity if train or self.eval_capacity is None else self.eval_capacity
    factor = (self.capacity_factor if train or self.eval_capacity_factor is None
              else self.eval_capacity_factor)
    if explicit is not None:
      if not 1 <= explicit <= num_tokens:
        raise ValueError(f'capacity must be in [1, {num_tokens}] (tokens per group), '
                         f'got {explicit}.')
      return int(explicit)
    if factor is None:
      return num_tokens
    return compute_capacity(num_tokens, num_experts, factor, k=k,
                            include_k=self.capacity_include_k, rounding=self.capacity_rounding,
                            multiple_of=self.capacity_multiple_of, min_capacity=self.min_capacity)

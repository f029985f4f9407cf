"""Capacity for routers whose paper has none (Shazeer 2017, DeepSeek): C = S by default.

With C = S every expert can take every token of its group, so no token is ever dropped
(a token never picks one expert twice). This costs an [E, S] slot buffer per group;
give a `capacity_factor` (or an explicit `capacity`) for a fixed compute budget.
"""
from __future__ import annotations

from moe_jax.routing.capacity import compute_capacity


def capacity_or_all(num_tokens: int, num_experts: int, k: int, *, capacity: int | None = None,
                    capacity_factor: float | None = None, include_k: bool = True,
                    rounding: str = 'ceil', multiple_of: int = 1, min_capacity: int = 1) -> int:
  """C: explicit `capacity`, else `compute_capacity(...)` from `capacity_factor`, else S."""
  if capacity is not None:
    if not 1 <= capacity <= num_tokens:
      raise ValueError(f'capacity must be in [1, {num_tokens}] (tokens per group), got {capacity}.')
    return int(capacity)
  if capacity_factor is None:
    return num_tokens
  return compute_capacity(num_tokens, num_experts, capacity_factor, k=k, include_k=include_k,
                          rounding=rounding, multiple_of=multiple_of, min_capacity=min_capacity)

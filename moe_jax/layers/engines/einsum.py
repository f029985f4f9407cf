"""The `einsum` engine: one-hot / dense dispatch and combine over `[G, S, E, C]`.

The vmoe / flaxformer baseline and the reference the other engines are tested against.
Its dispatch and combine are matmuls against mostly-zero `[G, S, E, C]` tensors:
memory and FLOPs grow as k·CF·S² per group, whatever E. The only engine that runs
dense (Soft MoE) routings, which every other engine hands to it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from moe_jax.routing import Routing

Array = jax.Array
ExpertFn = Callable[[Array], Array]   # [E, N, d] -> [E, N, d]


@dataclasses.dataclass(frozen=True)
class EinsumEngine:
  """Buffer engine: `dispatch` -> experts on `[E, G·C, d]` -> `combine`. No options."""
  name = 'einsum'
  # How expert parallelism runs it: 'buffer' = dispatch, all_to_all the [E, G, C, d]
  # buffer, experts, all_to_all back, combine (`moe_jax.parallel.expert_parallel`).
  expert_parallel = 'buffer'

  # Both einsums run on the [G, S, E·C] view of the weights, a batched matmul per group:
  # XLA:CPU runs ops on arrays with a trailing axis of size C = 1 (Soft MoE with one
  # slot per expert) several times slower, and a 4-D einsum adds transposes.

  def dispatch(self, x: Array, r: Routing) -> Array:
    """x: [G, S, d] -> [E, G, C, d]."""
    dispatch, _ = r.dense()
    g, s, e, c = dispatch.shape
    buf = jnp.einsum('gsn,gsd->gnd', dispatch.reshape(g, s, e * c).astype(x.dtype), x)
    return jnp.transpose(buf.reshape(g, e, c, -1), (1, 0, 2, 3))

  def combine(self, buf: Array, r: Routing) -> Array:
    """buf: [E, G, C, d] -> [G, S, d]."""
    _, combine = r.dense()
    g, s, e, c = combine.shape
    buf = jnp.transpose(buf, (1, 0, 2, 3)).reshape(g, e * c, -1)
    return jnp.einsum('gsn,gnd->gsd', combine.reshape(g, s, e * c).astype(buf.dtype), buf)

  def apply(self, x: Array, r: Routing, expert_fn: ExpertFn) -> Array:
    """x: [G, S, d] -> [G, S, d] through experts `expert_fn` ([E, N, d] -> [E, N, d])."""
    buf = self.dispatch(x, r)
    e, g, c, d = buf.shape
    out = expert_fn(buf.reshape(e, g * c, d)).reshape(e, g, c, -1)
    return self.combine(out, r).astype(x.dtype)

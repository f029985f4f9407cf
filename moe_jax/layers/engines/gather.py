"""The `gather` engine: index the slot table instead of multiplying by one-hots.

Dispatch gathers each slot's token; combine gathers each token's K slots and sums them
with their weights. Nothing of size S·E·C is allocated and no FLOP is spent on zeros.

With a token-side view (token-choice style routings) both directions of both steps
are gathers: the backward of "slot reads its token" is "token sums its K slots", and
the backward of "token reads its K slots" is "slot reads its one token" (custom VJPs
in `rows.py`). A scatter-add would serialise on XLA:CPU. Without a token-side view
(expert choice: a token sits in 0..E slots) combine is a scatter-add and dispatch
differentiates into one.

`apply` runs an `Experts` module on the buffer in blocks of at most 256 rows on CPU
(`grouped.py`), whose activations stay in cache; elsewhere one batched einsum. Dense
(Soft MoE) routings keep the einsum engine's dispatch and combine and get the same
expert loop.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moe_jax.layers.engines import grouped
from moe_jax.layers.engines.einsum import EinsumEngine
from moe_jax.layers.engines.rows import gather_rows, take_rows
from moe_jax.routing import Routing

Array = jax.Array

EXPERTS_IMPLS = ('auto', 'batched', 'blocks')


def slot_source(r: Routing) -> Array:
  """[E·G·C] int32: flat token index g·S + s of each slot, in buffer order (e, g, c);
  G·S for empty slots."""
  g, s = r.num_groups, r.num_tokens
  st = jnp.transpose(r.slot_token, (1, 0, 2))                          # [E, G, C]
  glob = st + s * jnp.arange(g, dtype=jnp.int32)[None, :, None]
  return jnp.where(st < s, glob, g * s).reshape(-1)


def token_buffer_pos(r: Routing) -> Array:
  """[G·S, K] int32: flat buffer row (e, g, c) of each token's k-th choice; E·G·C if dropped."""
  g, e, c = r.slot_token.shape
  ts = r.token_slot                                                    # [G, S, K], e*C + c
  gi = jnp.arange(g, dtype=jnp.int32)[:, None, None]
  pos = (ts // c) * (g * c) + gi * c + ts % c
  return jnp.where(ts < e * c, pos, e * g * c).reshape(g * r.num_tokens, -1)


def slot_owner(r: Routing, src: Array) -> Array:
  """[E·G·C, 1] int32: flat choice index (g·S + s)·K + k filling each slot; G·S·K if empty.

  Args:
    src: [E·G·C] `slot_source(r)`.
  """
  g, e, c = r.slot_token.shape
  k = r.token_slot.shape[-1]
  n = g * r.num_tokens
  cand = take_rows(r.token_slot.reshape(n, k), src).reshape(e, g, c, k)
  slot_id = (jnp.arange(e, dtype=jnp.int32)[:, None, None] * c
             + jnp.arange(c, dtype=jnp.int32)[None, None, :])          # [E, 1, C]
  match = cand == slot_id[..., None]
  owner = src.reshape(e, g, c) * k + jnp.argmax(match, axis=-1).astype(jnp.int32)
  owner = jnp.where((src.reshape(e, g, c) < n) & jnp.any(match, axis=-1), owner, n * k)
  return owner.reshape(-1, 1)


def buffer_tile(rows: int, max_tile: int = 256) -> int:
  """Block height for an expert's `rows` = G·C buffer rows: the fewest blocks of at most
  `max_tile` rows, as even as possible (the buffer is padded to a multiple)."""
  blocks = -(-rows // max_tile)
  return -(-rows // blocks)


@dataclasses.dataclass(frozen=True)
class GatherEngine(EinsumEngine):
  """Buffer engine by index. Dense routings (Soft MoE) use the einsum engine's dispatch
  and combine, which are dense by nature, and this engine's expert loop.

  Args:
    experts_impl: how `apply` runs an `Experts` module on the buffer: 'batched' (one
      batched einsum over E, the einsum engine's way), 'blocks' (the dropless engine's
      loop over blocks of at most `max_tile` rows, whose activations stay in cache:
      faster on CPU), or 'auto' (blocks on CPU, batched elsewhere). Other expert
      functions are always called on the `[E, G·C, d]` buffer.
    max_tile: largest block for 'blocks'.
  """
  name = 'gather'
  experts_impl: str = 'auto'
  max_tile: int = 256

  def __post_init__(self):
    if self.experts_impl not in EXPERTS_IMPLS:
      raise ValueError(f"experts_impl must be 'auto', 'batched' or 'blocks', "
                       f'got {self.experts_impl!r}.')

  def apply(self, x: Array, r: Routing, expert_fn) -> Array:
    """x: [G, S, d] -> [G, S, d]."""
    impl = self.experts_impl
    if impl == 'auto':
      impl = 'blocks' if grouped.default_impl() == 'blocks' else 'batched'
    if impl == 'batched' or not hasattr(expert_fn, 'apply_grouped'):
      return super().apply(x, r, expert_fn)
    buf = self.dispatch(x, r)
    e, g, c, d = buf.shape
    n = g * c
    tile = buffer_tile(n, self.max_tile)
    pad = -n % tile
    rows = jnp.pad(buf.reshape(e, n, d), ((0, 0), (0, pad), (0, 0))).reshape(-1, d)
    out = expert_fn.apply_grouped(expert_fn.params_dict(), rows, jnp.full((e,), n + pad, jnp.int32),
                                  impl='blocks', tile=tile)
    out = out.reshape(e, n + pad, -1)[:, :n]
    return self.combine(out.reshape(e, g, c, -1), r).astype(x.dtype)

  def dispatch(self, x: Array, r: Routing) -> Array:
    """x: [G, S, d] -> [E, G, C, d]."""
    if not r.is_sparse:
      return super().dispatch(x, r)
    g, s, d = x.shape
    src = slot_source(r)
    x_flat = x.reshape(g * s, d)
    if r.token_slot is not None:
      buf = gather_rows(x_flat, src, token_buffer_pos(r))
    else:
      buf = take_rows(x_flat, src)
    return buf.reshape(r.num_experts, g, r.capacity, d)

  def combine(self, buf: Array, r: Routing) -> Array:
    """buf: [E, G, C, d] -> [G, S, d]."""
    if not r.is_sparse:
      return super().combine(buf, r)
    e, g, c, d = buf.shape
    s = r.num_tokens
    if r.token_slot is not None:
      k = r.token_slot.shape[-1]
      pos = token_buffer_pos(r)                                        # [G*S, K]
      owner = slot_owner(r, slot_source(r))
      z = gather_rows(buf.reshape(e * g * c, d), pos.reshape(-1), owner)   # [G*S*K, d]
      # The weights come from the slot table (the source of truth after capacity).
      w = jnp.take_along_axis(r.slot_weight.reshape(g, e * c), r.token_slot.reshape(g, -1),
                              axis=1, mode='fill', fill_value=0).reshape(g, s, k)
      z = z.reshape(g, s, k, d)
      return jnp.einsum('gskd,gsk->gsd', z, w.astype(buf.dtype))
    weighted = jnp.transpose(buf, (1, 0, 2, 3)) * r.slot_weight[..., None].astype(buf.dtype)
    y = jnp.zeros((g, s, d), buf.dtype)
    return jax.vmap(lambda yy, idx, v: yy.at[idx].add(v, mode='drop'))(
        y, r.slot_token.reshape(g, e * c), weighted.reshape(g, e * c, d))

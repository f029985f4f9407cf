"""The `gather` engine: index the slot table instead of multiplying by one-hots.

Dispatch gathers each slot's token; combine gathers each token's K slots and sums them
with their weights. Nothing of size S·E·C is allocated and no FLOP is spent on zeros.

With a token-side view (token-choice style routings) both directions of both steps
are gathers: the backward of "slot reads its token" is "token sums its K slots", and
the backward of "token reads its K slots" is "slot reads its one token" (custom VJPs
in `rows.py`). A scatter-add would serialise on XLA:CPU. Without a token-side view
(expert choice: a token sits in 0..E slots) combine is a scatter-add and dispatch
differentiates into one.

On CPU `apply` runs an `Experts` module only on the slots that hold a token: their
rows, gathered straight from the tokens and sorted by expert (`filled_rows`), go
through the dropless engine's loop over each expert's rows in blocks (`grouped.py`),
whose activations stay in cache; empty slots cost nothing. Elsewhere one batched
einsum over the `[E, G·C, d]` buffer. Dense (Soft MoE) routings keep the einsum
engine's dispatch and combine and get the same expert loop. `dispatch` and `combine`
(the buffer form that expert parallelism moves with all_to_all) are unchanged.
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


def filled_rows(r: Routing) -> dict:
  """The filled-slot layout of a sparse routing: one row per slot that holds a token,
  sorted by expert (then group, then slot), contiguous. Returns a dict:

    rows: L, static bound on the filled slots (E·G·C, or G·S·K with a token-side view);
    group_sizes [E] int32: filled slots per expert;
    slot_row [E·G·C + 1] int32: row of each slot in buffer order (e, g, c), L if empty
      (the extra last entry, for index E·G·C, is L);
    row_slot [L] int32: slot of each row, E·G·C for unused rows;
    row_token [L] int32: flat token g·S + s of each row, G·S for unused rows.
  """
  g, e, c = r.slot_token.shape
  n_slots = e * g * c
  src = slot_source(r)                                                 # [E·G·C]
  filled = src < g * r.num_tokens
  length = n_slots if r.token_slot is None else min(n_slots, g * r.num_tokens
                                                    * r.token_slot.shape[-1])
  rank = jnp.cumsum(filled.astype(jnp.int32)) - 1
  slot_row = jnp.where(filled, rank, length)
  row_slot = jnp.full(length, n_slots, jnp.int32).at[slot_row].set(
      jnp.arange(n_slots, dtype=jnp.int32), mode='drop')
  sizes = jnp.sum(filled.reshape(e, g * c), axis=1, dtype=jnp.int32)
  return dict(rows=length, group_sizes=sizes, row_slot=row_slot,
              slot_row=jnp.concatenate([slot_row, jnp.full((1,), length, jnp.int32)]),
              row_token=take_rows(src[:, None], row_slot)[:, 0] + jnp.where(
                  row_slot < n_slots, 0, g * r.num_tokens))


@dataclasses.dataclass(frozen=True)
class GatherEngine(EinsumEngine):
  """Buffer engine by index. Dense routings (Soft MoE) use the einsum engine's dispatch
  and combine, which are dense by nature, and this engine's expert loop.

  Args:
    experts_impl: how `apply` runs an `Experts` module: 'blocks' (only the slots that
      hold a token, as contiguous rows sorted by expert (`filled_rows`), through the
      dropless engine's loop over each expert's rows in blocks of at most `max_tile`
      rows, whose activations stay in cache: faster on CPU), 'batched' (the whole
      `[E, G·C, d]` buffer, empty slots included, in one batched einsum over E, the
      einsum engine's way), or 'auto' (blocks on CPU, batched elsewhere). Other expert
      functions are always called on the buffer.
    max_tile, min_tile: 'blocks' runs an expert's rows in blocks of `max_tile` rows and
      the remainder in one block of a multiple of `min_tile` rows (powers of two; None:
      `grouped.default_tiles`).
  """
  name = 'gather'
  experts_impl: str = 'auto'
  max_tile: int | None = None
  min_tile: int | None = None

  def __post_init__(self):
    if self.experts_impl not in EXPERTS_IMPLS:
      raise ValueError(f"experts_impl must be 'auto', 'batched' or 'blocks', "
                       f'got {self.experts_impl!r}.')

  def _impl(self, expert_fn=None) -> str:
    """'blocks' or 'batched' for `expert_fn` (None: an `Experts` module)."""
    impl = self.experts_impl
    if impl == 'auto':
      impl = 'blocks' if grouped.default_impl() == 'blocks' else 'batched'
    if expert_fn is not None and not hasattr(expert_fn, 'apply_grouped'):
      return 'batched'
    return impl

  def apply(self, x: Array, r: Routing, expert_fn) -> Array:
    """x: [G, S, d] -> [G, S, d]."""
    if self._impl(expert_fn) == 'batched':
      return super().apply(x, r, expert_fn)
    run = lambda rows, sizes: expert_fn.apply_grouped(
        expert_fn.params_dict(), rows, sizes, impl='blocks', tile=self.max_tile,
        min_tile=self.min_tile)
    if not r.is_sparse:     # Soft MoE: every slot is filled
      buf = self.dispatch(x, r)
      e, g, c, d = buf.shape
      out = run(buf.reshape(e * g * c, d), jnp.full((e,), g * c, jnp.int32))
      return self.combine(out.reshape(e, g, c, -1), r).astype(x.dtype)
    g, s, d = x.shape
    lay = filled_rows(r)
    x_flat = x.reshape(g * s, d)
    if r.token_slot is None:       # expert choice: a token sits in 0..E slots
      y_rows = run(take_rows(x_flat, lay['row_token']), lay['group_sizes'])
      w = take_rows(jnp.transpose(r.slot_weight, (1, 0, 2)).reshape(-1, 1), lay['row_slot'])
      y = jnp.zeros((g * s, y_rows.shape[-1]), y_rows.dtype)
      y = y.at[lay['row_token']].add(y_rows * w.astype(y_rows.dtype), mode='drop')
      return y.reshape(g, s, -1).astype(x.dtype)
    choice_row = lay['slot_row'][token_buffer_pos(r)]                 # [G·S, K]
    owner = take_rows(slot_owner(r, slot_source(r)), lay['row_slot'])
    owner = jnp.where(lay['row_slot'][:, None] < r.slot_token.size, owner, choice_row.size)
    y_rows = run(gather_rows(x_flat, lay['row_token'], choice_row), lay['group_sizes'])
    z = gather_rows(y_rows, choice_row.reshape(-1), owner)            # [G·S·K, d]
    return self._weighted_sum(z, r).astype(x.dtype)

  def executed_rows(self, r: Routing, num_experts: int) -> Array:
    """Rows the experts' MLP computes (for FLOP accounting): the filled slots plus the
    masked rows of each expert's last block ('blocks'), or every slot ('batched')."""
    if self._impl() == 'batched':
      return jnp.asarray(r.num_groups * num_experts * r.capacity)
    if not r.is_sparse:
      sizes = jnp.full((num_experts,), r.num_groups * r.capacity)
      rows = num_experts * r.num_groups * r.capacity
    else:
      lay = filled_rows(r)
      rows, sizes = lay['rows'], lay['group_sizes']
    m = self.min_tile or grouped.default_tiles(rows, num_experts)[1]
    return jnp.sum(-(-sizes // m) * m)

  def _weighted_sum(self, z: Array, r: Routing) -> Array:
    """z [G·S·K, d] each token's K slot outputs -> [G, S, d], weighted by the slot table
    (the source of truth after capacity)."""
    g, e, c = r.slot_token.shape
    s, k = r.num_tokens, r.token_slot.shape[-1]
    w = jnp.take_along_axis(r.slot_weight.reshape(g, e * c), r.token_slot.reshape(g, -1),
                            axis=1, mode='fill', fill_value=0).reshape(g, s, k)
    # A multiply and a sum over K: XLA:CPU runs the einsum 'gskd,gsk->gsd' as a slow
    # batched matmul (3.5x slower).
    return jnp.sum(z.reshape(g, s, k, -1) * w[..., None].astype(z.dtype), axis=2)

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
      pos = token_buffer_pos(r)                                        # [G*S, K]
      owner = slot_owner(r, slot_source(r))
      z = gather_rows(buf.reshape(e * g * c, d), pos.reshape(-1), owner)   # [G*S*K, d]
      return self._weighted_sum(z, r)
    weighted = jnp.transpose(buf, (1, 0, 2, 3)) * r.slot_weight[..., None].astype(buf.dtype)
    y = jnp.zeros((g, s, d), buf.dtype)
    return jax.vmap(lambda yy, idx, v: yy.at[idx].add(v, mode='drop'))(
        y, r.slot_token.reshape(g, e * c), weighted.reshape(g, e * c, d))

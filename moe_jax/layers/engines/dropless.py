"""The `dropless` engine: sort by expert, grouped MLP, unsort and combine.

Uses the token-side view of the routing *before capacity* (`token_expert`,
`token_weight`), so no token choice is ever dropped, however unbalanced the routing:
the router's capacity only sizes the slot table, which this engine ignores. With
enough capacity for nothing to be dropped it gives the numbers of the buffer engines.

    N = G·S·K (token, choice) pairs, sorted by expert (one stable sort of N ints)
    x_rows = x[token of each sorted pair]             gather; backward: gather
    y_rows = grouped_mlp(x_rows, group sizes)          `grouped.py`
    y[t]   = Σ_k w[t, k] · y_rows[row of (t, k)]       gather; backward: gather

On CPU the rows are laid out in tile-aligned blocks (`impl='blocks'`), on GPU/TPU
contiguously for `jax.lax.ragged_dot` (`impl='ragged'`).

Routings without a token-side view (expert choice, Soft MoE) drop nothing by
construction; the engine hands them to the gather engine (which hands dense ones to
einsum), so `engine='dropless'` works with every router.

Under a mesh (`moe_jax.parallel.expert_parallel` passes a `LocalExperts`), the rows
are laid out contiguously and exchanged by `moe_jax.parallel.ragged`:
`ragged_all_to_all` on GPU/TPU, a padded `all_to_all` on CPU. Each device's receive
buffer has the worst-case n·N rows (n = |expert|, N = its G·S·K choices), since every
choice of every device could pick this device's experts; the padded exchange also
sends n·N rows. So the CPU fallback holds about 2·n·N·d exchanged values and n·N
hidden rows of the local MLP per device, where the single-device engine holds N.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moe_jax.layers.engines import grouped
from moe_jax.layers.engines.gather import GatherEngine
from moe_jax.layers.engines.rows import gather_rows
from moe_jax.parallel import ragged as ragged_lib
from moe_jax.parallel.expert_parallel import LocalExperts
from moe_jax.routing import Routing

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DroplessEngine:
  """Token-choice routings without capacity.

  Args:
    impl: 'auto' (ragged_dot on GPU/TPU, blocks elsewhere), 'blocks' or 'ragged'.
    tile: block height for 'blocks'; None picks `grouped.default_tile(N, E)`.
    exchange: under a mesh, how rows reach their experts' devices:
      'auto' (ragged_all_to_all on GPU/TPU, padded all_to_all on CPU), 'ragged',
      'padded' or 'emulated' (see `moe_jax.parallel.ragged`).
  """
  name = 'dropless'
  # How expert parallelism runs it: 'rows' = the engine receives a `LocalExperts` and
  # exchanges its expert-sorted rows itself (`moe_jax.parallel.expert_parallel`).
  expert_parallel = 'rows'
  impl: str = 'auto'
  tile: int | None = None
  exchange: str = 'auto'

  def __post_init__(self):
    if self.impl not in grouped.IMPLS:
      raise ValueError(f'impl must be one of {grouped.IMPLS}, got {self.impl!r}.')
    if self.tile is not None and self.tile < 1:
      raise ValueError(f'tile must be a positive int, got {self.tile!r}.')
    # check_impl, not resolve_impl: 'auto' resolves on the backend when the layer runs.
    ragged_lib.check_impl(self.exchange)

  def dispatch(self, x, r):
    raise NotImplementedError('the dropless engine has no fixed-size expert buffer; expert '
                              'parallelism with buffers needs engine="gather" or "einsum".')

  combine = dispatch

  def layout(self, r: Routing, num_experts: int, impl: str | None = None) -> dict:
    """Where each (token, choice) goes. Returns a dict of int32 arrays:

    rows: L, static row count; tile: block height (0 for ragged);
    row_token [L]: flat token g·S + s of each row (G·S for padding);
    row_owner [L, 1]: flat choice (g·S + s)·K + k of each row (N for padding);
    choice_row [G·S, K]: row of each choice; group_sizes [E].
    `impl` overrides the engine's ('ragged': contiguous rows, as the exchange needs).
    """
    g, s, k = r.token_expert.shape
    n = g * s * k
    impl = impl or self.impl
    impl = grouped.default_impl() if impl == 'auto' else impl
    e_flat = r.token_expert.reshape(n).astype(jnp.int32)
    choice = jnp.arange(n, dtype=jnp.int32)
    e_sorted, order = jax.lax.sort((e_flat, choice), num_keys=1, is_stable=True)
    sizes = jnp.zeros(num_experts, jnp.int32).at[e_flat].add(1)
    if impl == 'ragged':
      tile, rows = 0, n
      row_of_sorted = choice
    else:
      tile = self.tile or grouped.default_tile(n, num_experts)
      rows = tile * grouped.max_blocks(n, num_experts, tile)
      starts = jnp.cumsum(sizes) - sizes
      row_of_sorted = grouped.padded_starts(sizes, tile)[e_sorted] + choice - starts[e_sorted]
    choice_row = jnp.zeros(n, jnp.int32).at[order].set(row_of_sorted)
    row_owner = jnp.full(rows, n, jnp.int32).at[row_of_sorted].set(order)
    row_token = jnp.where(row_owner < n, row_owner // k, g * s)
    return dict(rows=rows, tile=tile, impl=impl, row_token=row_token,
                row_owner=row_owner[:, None], choice_row=choice_row.reshape(g * s, k),
                group_sizes=sizes)

  def apply(self, x: Array, r: Routing, experts) -> Array:
    """x: [G, S, d] -> [G, S, d]; `experts` must be an `Experts` module."""
    local = isinstance(experts, LocalExperts)
    if r.token_expert is None:
      return GatherEngine().apply(x, r, experts.buffer_fn if local else experts)
    if not hasattr(experts, 'apply_grouped'):
      raise TypeError('the dropless engine needs an `Experts` module (with apply_grouped), '
                      f'got {type(experts).__name__}.')
    g, s, d = x.shape
    k = r.token_expert.shape[-1]
    lay = self.layout(r, experts.num_experts, impl='ragged' if local else None)
    x_rows = gather_rows(x.reshape(g * s, d), lay['row_token'], lay['choice_row'])
    if local:
      y_rows = self._apply_sharded(experts, x_rows, lay['group_sizes'])
    else:
      y_rows = experts.apply_grouped(experts.params_dict(), x_rows, lay['group_sizes'],
                                     impl=lay['impl'], tile=lay['tile'])
    z = gather_rows(y_rows, lay['choice_row'].reshape(-1), lay['row_owner'])   # [N, d]
    w = r.token_weight.astype(z.dtype)
    return jnp.einsum('gskd,gsk->gsd', z.reshape(g, s, k, -1), w).astype(x.dtype)

  def _apply_sharded(self, experts: LocalExperts, x_rows: Array, group_sizes: Array) -> Array:
    """Inside the expert-parallel shard_map: x_rows [N, d] sorted by global expert,
    contiguous, group_sizes [E] -> [N, d]: rows to their experts' devices and back."""
    plan = None
    if experts.expert_axis is not None:
      x_rows, group_sizes, plan = ragged_lib.ragged_dispatch(
          x_rows, group_sizes, axis_name=experts.expert_axis, impl=self.exchange)
    y_rows = self._local_mlp(experts, x_rows, group_sizes)
    return y_rows if plan is None else ragged_lib.ragged_return(y_rows, plan)

  def _local_mlp(self, experts: LocalExperts, rows: Array, sizes: Array) -> Array:
    """This device's experts on rows [R, d] grouped contiguously by local expert
    (`sizes` [E_local]; rows past their sum are ignored) -> [R, d]."""
    params = experts.params_dict()
    # Under tensor parallelism each device holds a slice of h: partial sums, then b_out.
    b_out = params.pop('b_out', None) if experts.model_axis is not None else None
    impl = grouped.default_impl() if self.impl == 'auto' else self.impl
    num_rows, e_loc = rows.shape[0], sizes.shape[0]
    if impl == 'ragged':
      y = experts.apply_grouped(params, rows, sizes, impl='ragged')
    else:   # re-lay the received rows into tile-aligned blocks
      tile = self.tile or grouped.default_tile(num_rows // max(1, experts.expert_axis_size),
                                               e_loc)
      length = tile * grouped.max_blocks(num_rows, e_loc, tile)
      i = jnp.arange(num_rows, dtype=jnp.int32)
      ends = jnp.cumsum(sizes)
      e = jnp.minimum(jnp.searchsorted(ends, i, side='right'), e_loc - 1).astype(jnp.int32)
      dst = grouped.padded_starts(sizes, tile)[e] + i - (ends - sizes)[e]
      dst = jnp.where(i < ends[-1], dst, length)                       # [R]; length = unused
      src = jnp.full(length, num_rows, jnp.int32).at[dst].set(i, mode='drop')   # [L]
      blocks = gather_rows(rows, src, dst[:, None])
      y_blocks = experts.apply_grouped(params, blocks, sizes, impl='blocks', tile=tile)
      y = gather_rows(y_blocks, dst, src[:, None])
    if experts.model_axis is not None:
      y = jax.lax.psum(y, experts.model_axis)
      if b_out is not None:
        row_expert = jnp.repeat(jnp.arange(e_loc, dtype=jnp.int32), sizes,
                                total_repeat_length=num_rows)
        y = y + jnp.take(b_out.astype(y.dtype), row_expert, axis=0)
    return y

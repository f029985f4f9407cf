"""The `dropless` engine: sort by expert, grouped MLP, unsort and combine.

Uses the token-side view of the routing *before capacity* (`token_expert`,
`token_weight`), so no token choice is ever dropped, however unbalanced the routing:
the router's capacity only sizes the slot table, which this engine ignores. With
enough capacity for nothing to be dropped it gives the numbers of the buffer engines.

    N = G·S·K (token, choice) pairs, sorted by expert (one stable sort of N ints)
    x_rows = x[token of each sorted pair]             gather; backward: gather
    y_rows = grouped_mlp(x_rows, group sizes)          `grouped.py`
    y[t]   = Σ_k w[t, k] · y_rows[row of (t, k)]       gather; backward: gather

The rows are contiguous, expert after expert, nothing padded: `jax.lax.ragged_dot`
runs them on GPU/TPU (`impl='ragged'`), a loop over each expert's rows in blocks on
CPU (`impl='blocks'`, `grouped.py`).

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
    tile, min_tile: 'blocks' runs an expert's rows in blocks of `tile` rows and the
      remainder in one block of a multiple of `min_tile` rows (powers of two; None:
      `grouped.default_tiles`).
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
  min_tile: int | None = None
  exchange: str = 'auto'

  def __post_init__(self):
    if self.impl not in grouped.IMPLS:
      raise ValueError(f'impl must be one of {grouped.IMPLS}, got {self.impl!r}.')
    for name in ('tile', 'min_tile'):
      v = getattr(self, name)
      if v is not None and (v < 1 or v & (v - 1)):
        raise ValueError(f'{name} must be a power of two, got {v!r}.')
    # check_impl, not resolve_impl: 'auto' resolves on the backend when the layer runs.
    ragged_lib.check_impl(self.exchange)

  def dispatch(self, x, r):
    raise NotImplementedError('the dropless engine has no fixed-size expert buffer; expert '
                              'parallelism with buffers needs engine="gather" or "einsum".')

  combine = dispatch

  def layout(self, r: Routing, num_experts: int, impl: str | None = None) -> dict:
    """Where each (token, choice) goes: rows sorted by expert, contiguous. Returns a dict:

    rows: N = G·S·K, static row count; impl: 'blocks' or 'ragged';
    row_token [N]: flat token g·S + s of each row;
    row_owner [N, 1]: flat choice (g·S + s)·K + k of each row;
    choice_row [G·S, K]: row of each choice; group_sizes [E].
    """
    g, s, k = r.token_expert.shape
    n = g * s * k
    impl = impl or self.impl
    impl = grouped.default_impl() if impl == 'auto' else impl
    e_flat = r.token_expert.reshape(n).astype(jnp.int32)
    choice = jnp.arange(n, dtype=jnp.int32)
    e_sorted, order = jax.lax.sort((e_flat, choice), num_keys=1, is_stable=True)
    ends = jnp.searchsorted(e_sorted, jnp.arange(num_experts, dtype=jnp.int32), side='right')
    sizes = jnp.diff(ends.astype(jnp.int32), prepend=0)
    choice_row = jnp.zeros(n, jnp.int32).at[order].set(choice)
    return dict(rows=n, impl=impl, row_token=order // k, row_owner=order[:, None],
                choice_row=choice_row.reshape(g * s, k), group_sizes=sizes)

  def executed_rows(self, r: Routing, num_experts: int) -> Array:
    """Rows the experts' MLP computes (for FLOP accounting): every choice, plus the
    masked rows of each expert's last block ('blocks'), or E× all rows ('ragged' on
    CPU, where ragged_dot multiplies every row by every expert)."""
    if r.token_expert is None:
      return GatherEngine().executed_rows(r, num_experts)
    lay = self.layout(r, num_experts)
    if lay['impl'] == 'ragged':
      cpu = jax.default_backend() == 'cpu'
      return jnp.asarray(lay['rows'] * (num_experts if cpu else 1))
    m = self.min_tile or grouped.default_tiles(lay['rows'], num_experts)[1]
    return jnp.sum(-(-lay['group_sizes'] // m) * m)

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
    lay = self.layout(r, experts.num_experts)
    x_rows = gather_rows(x.reshape(g * s, d), lay['row_token'], lay['choice_row'])
    if local:
      y_rows = self._apply_sharded(experts, x_rows, lay['group_sizes'])
    else:
      y_rows = experts.apply_grouped(experts.params_dict(), x_rows, lay['group_sizes'],
                                     impl=lay['impl'], tile=self.tile, min_tile=self.min_tile)
    z = gather_rows(y_rows, lay['choice_row'].reshape(-1), lay['row_owner'])   # [N, d]
    w = r.token_weight.astype(z.dtype)
    # A multiply and a sum over K: XLA:CPU runs the einsum 'gskd,gsk->gsd' as a slow
    # batched matmul (3.5x slower).
    return jnp.sum(z.reshape(g, s, k, -1) * w[..., None], axis=2).astype(x.dtype)

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
    y = experts.apply_grouped(params, rows, sizes, impl=impl, tile=self.tile,
                              min_tile=self.min_tile)
    if experts.model_axis is not None:
      y = jax.lax.psum(y, experts.model_axis)
      if b_out is not None:
        row_expert = jnp.repeat(jnp.arange(e_loc, dtype=jnp.int32), sizes,
                                total_repeat_length=num_rows)
        y = y + jnp.take(b_out.astype(y.dtype), row_expert, axis=0)
    return y

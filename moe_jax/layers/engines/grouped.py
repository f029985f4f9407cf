"""Grouped expert MLP: rows sorted by expert, each row through its own expert's MLP.

Two implementations, same numbers:

* `ragged`: `jax.lax.ragged_dot` on contiguous groups. A grouped GEMM on GPU/TPU; on
  XLA:CPU it lowers to a dense product of every row with every expert (E× the FLOPs).
* `blocks`: each expert's rows start at a multiple of `tile` (the engine pads them
  there), so every block of `tile` rows belongs to one expert. A loop over the blocks
  actually used runs the whole MLP of a block as small dense matmuls, which stay in
  cache on a CPU. The loop has a data-dependent trip count, so it has a custom VJP: a
  second loop over the same blocks accumulates weight gradients per expert. Padding
  rows cost compute (at most `tile - 1` per expert) but never reach the output.

    y = grouped_mlp(params, x, group_sizes, activation='gelu', glu=False,
                    impl='blocks', tile=128)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLS = ('auto', 'blocks', 'ragged')
ACTIVATIONS = {'gelu': jax.nn.gelu, 'relu': jax.nn.relu, 'silu': jax.nn.silu}


def default_impl() -> str:
  """'ragged' where ragged_dot is a grouped GEMM (GPU, TPU), 'blocks' elsewhere."""
  return 'ragged' if jax.default_backend() in ('gpu', 'tpu', 'cuda', 'rocm') else 'blocks'


def default_tile(num_rows: int, num_experts: int) -> int:
  """Block height: the average group size rounded down to a power of two, in [32, 128].

  Blocks of 64-128 rows run the MLP at (or above) the speed of one big matmul on
  XLA:CPU, 16-32 rows at about half; padding wastes on average `tile / 2` rows per
  expert, so small groups want small tiles.
  """
  avg = max(1, num_rows // max(num_experts, 1))
  return int(min(128, max(32, 1 << (avg.bit_length() - 1))))


def max_blocks(num_rows: int, num_experts: int, tile: int) -> int:
  """Static bound on Σ_e ceil(n_e / tile) over all group sizes n_e summing to num_rows."""
  return max(1, min(num_rows, (num_rows + num_experts * (tile - 1)) // tile))


def padded_starts(group_sizes: Array, tile: int) -> Array:
  """[E] int32: first row of each expert in the block layout."""
  blocks = (group_sizes + tile - 1) // tile
  return ((jnp.cumsum(blocks) - blocks) * tile).astype(jnp.int32)


def expert_blocks(group_sizes: Array, tile: int) -> tuple[Array, Array]:
  """First block [E] and number of blocks [E] of each expert in the block layout."""
  blocks = ((group_sizes + tile - 1) // tile).astype(jnp.int32)
  return jnp.cumsum(blocks) - blocks, blocks


def _varying_like(z: Array, *refs) -> Array:
  """z, cast to vary over the manual mesh axes any of `refs` (pytrees) vary over.

  Inside `shard_map` a loop carry must keep its varying axes from one step to the next;
  zeros start invariant, so they take those of the arrays written into them. Identity
  outside shard_map.
  """
  axes = set().union(*(_varying(r) for r in jax.tree.leaves(refs))) - _varying(z)
  return jax.lax.pcast(z, tuple(sorted(axes)), to='varying') if axes else z


def _varying(a) -> set:
  return set(getattr(getattr(jax.typeof(a), 'manual_axis_type', None), 'varying', ()))


def _sum_to(g: Array, primal: Array) -> Array:
  """A cotangent summed over the manual axes it varies over and its primal does not
  (the primal was implicitly broadcast there), as custom VJPs must return."""
  axes = _varying(g) - _varying(primal)
  return jax.lax.psum(g, tuple(sorted(axes))) if axes else g


@functools.lru_cache(maxsize=None)
def _block_mlp(tile: int, activation: str, glu: bool):
  """The custom-VJP block loop for one (tile, activation, glu).

  Loops over experts, and within an expert over its blocks: an expert's weights are
  sliced once (XLA copies a dynamic slice) and its weight gradients are summed in a
  small carry and written once, instead of a read-modify-write per block.
  """
  act = ACTIVATIONS[activation]

  def expert_loop(p, first, count, body, carry):
    """body(pe, b, carry) over the blocks b of every expert; pe = expert e's params."""
    def per_expert(e, carry):
      pe = {k: v[e] for k, v in p.items()}
      start = first[e]
      return jax.lax.fori_loop(start, start + count[e], functools.partial(body, pe, e), carry)
    return jax.lax.fori_loop(0, first.shape[0], per_expert, carry)

  def forward(p, x, first, count):
    length, hidden = x.shape[0], p['w_in'].shape[-1]

    def body(pe, e, b, carry):
      y, h_all, g_all = carry
      start = b * tile
      xb = jax.lax.dynamic_slice_in_dim(x, start, tile)
      h = xb @ pe['w_in'] + pe['b_in'] if 'b_in' in pe else xb @ pe['w_in']
      gate = xb @ pe['w_gate'] if glu else None
      a = act(gate) * h if glu else act(h)
      yb = a @ pe['w_out'] + pe['b_out'] if 'b_out' in pe else a @ pe['w_out']
      y = jax.lax.dynamic_update_slice_in_dim(y, yb.astype(y.dtype), start, 0)
      h_all = jax.lax.dynamic_update_slice_in_dim(h_all, h, start, 0)
      if glu:
        g_all = jax.lax.dynamic_update_slice_in_dim(g_all, gate, start, 0)
      return y, h_all, g_all

    zeros = lambda n: _varying_like(jnp.zeros((length, n), x.dtype), p, x)
    carry = (zeros(p['w_out'].shape[-1]), zeros(hidden), zeros(hidden) if glu else None)
    return expert_loop(p, first, count, body, carry)

  @jax.custom_vjp
  def mlp(p, x, first, count):
    return forward(p, x, first, count)[0]

  def mlp_fwd(p, x, first, count):
    y, h_all, g_all = forward(p, x, first, count)
    return y, (p, x, first, count, h_all, g_all)

  def mlp_bwd(res, dy):
    p, x, first, count, h_all, g_all = res
    acc_dtype = lambda w: jnp.promote_types(w.dtype, jnp.float32)

    def body(pe, e, b, carry):
      dx, acc = carry
      start = b * tile
      sl = lambda a: jax.lax.dynamic_slice_in_dim(a, start, tile)
      xb, h, dyb = sl(x), sl(h_all), sl(dy)
      if glu:
        ga, gate_vjp = jax.vjp(act, sl(g_all))
        a = ga * h
      else:
        a, act_vjp = jax.vjp(act, h)
      upd = {'w_out': a.T @ dyb}
      da = dyb @ pe['w_out'].T
      if glu:
        dh = da * ga
        dgate = gate_vjp(da * h)[0]
        upd['w_gate'] = xb.T @ dgate
        dxb = dh @ pe['w_in'].T + dgate @ pe['w_gate'].T
      else:
        dh = act_vjp(da)[0]
        dxb = dh @ pe['w_in'].T
      upd['w_in'] = xb.T @ dh
      if 'b_in' in pe:
        upd['b_in'] = jnp.sum(dh, axis=0)
      if 'b_out' in pe:
        upd['b_out'] = jnp.sum(dyb, axis=0)
      acc = {k: acc[k] + upd[k].astype(acc[k].dtype) for k in acc}
      return jax.lax.dynamic_update_slice_in_dim(dx, dxb.astype(dx.dtype), start, 0), acc

    def per_expert(e, carry):
      dx, grads = carry
      pe = {k: v[e] for k, v in p.items()}
      acc = {k: _varying_like(jnp.zeros(v.shape[1:], acc_dtype(v)), p, x, dy)
             for k, v in p.items()}
      dx, acc = jax.lax.fori_loop(first[e], first[e] + count[e], functools.partial(body, pe, e),
                                  (dx, acc))
      grads = {k: jax.lax.dynamic_update_index_in_dim(grads[k], acc[k], e, 0) for k in grads}
      return dx, grads

    grads0 = {k: _varying_like(jnp.zeros(v.shape, acc_dtype(v)), p, x, dy) for k, v in p.items()}
    dx0 = _varying_like(jnp.zeros_like(x), p, x, dy)
    dx, grads = jax.lax.fori_loop(0, first.shape[0], per_expert, (dx0, grads0))
    return ({k: _sum_to(grads[k].astype(p[k].dtype), p[k]) for k in grads}, _sum_to(dx, x),
            None, None)

  mlp.defvjp(mlp_fwd, mlp_bwd)
  return mlp


def _ragged_mlp(p: dict, x: Array, group_sizes: Array, activation: str, glu: bool) -> Array:
  act = ACTIVATIONS[activation]
  num_experts = group_sizes.shape[0]
  row_expert = jnp.repeat(jnp.arange(num_experts, dtype=jnp.int32), group_sizes,
                          total_repeat_length=x.shape[0])
  h = jax.lax.ragged_dot(x, p['w_in'], group_sizes)
  if 'b_in' in p:
    h = h + jnp.take(p['b_in'], row_expert, axis=0)
  a = act(jax.lax.ragged_dot(x, p['w_gate'], group_sizes)) * h if glu else act(h)
  y = jax.lax.ragged_dot(a, p['w_out'], group_sizes)
  if 'b_out' in p:
    y = y + jnp.take(p['b_out'], row_expert, axis=0)
  return y


def grouped_mlp(params: dict, x: Array, group_sizes: Array, *, activation: str = 'gelu',
                glu: bool = False, impl: str = 'auto', tile: int | None = None) -> Array:
  """Every row through the MLP of its expert.

  Args:
    params: 'w_in' [E, d, h], 'w_out' [E, h, d], optional 'w_gate' [E, d, h] (GLU),
      'b_in' [E, h], 'b_out' [E, d]; already in the compute dtype.
    x: [L, d] rows grouped by expert. impl 'ragged': expert e owns the `group_sizes[e]`
      rows after those of experts < e (rows past Σ group_sizes are ignored). impl
      'blocks': expert e's rows start at `padded_starts(group_sizes, tile)[e]`, L is a
      multiple of tile and at least `tile · max_blocks(...)`; other rows are padding.
    group_sizes: [E] int32 rows per expert.
    activation, glu: the expert MLP (see `Experts`).
    impl: 'ragged', 'blocks', or 'auto' (`default_impl()`).
    tile: block height for 'blocks' (required there).

  Returns:
    [L, d]; padding rows hold unspecified values (zero outside the blocks in use).
  """
  if impl == 'auto':
    impl = default_impl()
  if impl not in IMPLS:
    raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}.')
  p = {k: v for k, v in params.items() if v is not None}
  if glu != ('w_gate' in p):
    raise ValueError(f'glu={glu} but params {"have" if "w_gate" in p else "lack"} w_gate.')
  if impl == 'ragged':
    return _ragged_mlp(p, x, group_sizes, activation, glu)
  if not tile or x.shape[0] % tile:
    raise ValueError(f'impl="blocks" needs a tile dividing the {x.shape[0]} rows, got {tile!r}.')
  first, count = expert_blocks(group_sizes, tile)
  return _block_mlp(int(tile), activation, bool(glu))(p, x, first, count)

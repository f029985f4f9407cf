"""Grouped expert MLP: rows sorted by expert, each row through its own expert's MLP.

Rows are contiguous: expert e owns the `group_sizes[e]` rows after those of experts < e.
Two implementations, same numbers:

* `ragged`: `jax.lax.ragged_dot`. A grouped GEMM on GPU/TPU; on XLA:CPU it lowers to a
  dense product of every row with every expert (E× the FLOPs).
* `blocks`: a loop over experts, and within an expert over its rows in blocks of
  `tile` rows, then one block for the remainder, its height rounded up to a multiple
  of `min_tile` (the extra rows masked): no row is padded and the whole MLP of a block
  runs as small dense matmuls whose activations stay in cache on a CPU. The loop has a
  data-dependent trip count, so it has a custom VJP: a second loop over the same
  blocks sums each expert's weight gradients in a small carry. Only rows that belong
  to an expert are computed (at most `min_tile - 1` extra rows per expert, masked out).

    y = grouped_mlp(params, x, group_sizes, activation='gelu', glu=False,
                    impl='blocks', tile=128)
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLS = ('auto', 'blocks', 'ragged')
ACTIVATIONS = {'gelu': jax.nn.gelu, 'relu': jax.nn.relu, 'silu': jax.nn.silu}


def default_tiles(num_rows: int, num_experts: int) -> tuple[int, int]:
  """(tile, min_tile) of 'blocks' for `num_rows` rows over `num_experts` experts.

  Measured on XLA:CPU (2 cores, d = 256, h = 1024): fewer, larger blocks are faster
  (an expert in one block of its own height beats several), and up to 512 rows a block
  gains: the tile is the power of two at or above 1.25x the average rows per expert,
  in [64, 512], so that most experts are one block; the remainder's heights step by
  tile/32 rows (at least 8), so that at most a few percent of the rows are masked.
  """
  avg = max(1, num_rows // max(num_experts, 1))
  tile = 1 << max(0, (avg + avg // 4 - 1).bit_length())
  tile = min(512, max(64, tile))
  return tile, max(8, tile // 32)


def default_impl() -> str:
  """'ragged' where ragged_dot is a grouped GEMM (GPU, TPU), 'blocks' elsewhere."""
  return 'ragged' if jax.default_backend() in ('gpu', 'tpu', 'cuda', 'rocm') else 'blocks'


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


def _mm(a: Array, b: Array) -> Array:
  """a @ b, accumulated and returned in float32. For bf16 operands XLA:CPU then runs a
  native bf16 matmul (YNNPACK, AVX512-BF16); a bf16 -> bf16 product is instead upcast
  to a float32 matmul with a conversion pass over both operands on every call."""
  return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def _split(tile: int, min_tile: int, start, n):
  """An expert's rows [start, start + n) as `n // tile` full blocks from `start` and the
  remainder: (full blocks, first remainder row, remainder rows, remainder class c: its
  block has c·min_tile rows, 0 when there is no remainder)."""
  nfull = n // tile
  rest = n - nfull * tile
  return nfull, start + nfull * tile, rest, (rest + min_tile - 1) // min_tile


def _remainder(cls, heights, block, carry, first: int = 1, group: int = 8):
  """`block(heights[cls - first], carry)`, or `carry` when cls is not in range: chains
  of conditionals, each with one branch that updates the carry in place (one
  `lax.switch` has several such branches, and XLA copies the carry for each), nested
  by groups of `group` heights so that an expert evaluates few conditions."""
  if len(heights) <= group:
    for c, h in enumerate(heights, start=first):
      carry = jax.lax.cond(cls == c, functools.partial(block, h), lambda x: x, carry)
    return carry
  step = math.isqrt(len(heights) - 1) + 1      # about sqrt(n) groups of sqrt(n)
  for i in range(0, len(heights), step):
    part = heights[i:i + step]
    lo = first + i
    inner = functools.partial(_remainder, cls, part, block, first=lo, group=group)
    carry = jax.lax.cond((cls >= lo) & (cls < lo + len(part)), inner, lambda x: x, carry)
  return carry


def _block_start(pos, valid, size: int, length: int):
  """(first row of the block, [size, 1] mask of its real rows or None)."""
  if valid is None:
    return pos, None
  first = jnp.minimum(pos, length - size)
  i = jnp.arange(size, dtype=jnp.int32)[:, None] + first
  return first, (i >= pos) & (i < pos + valid)


def _write(buf: Array, block: Array, first, mask) -> Array:
  """buf[first:first+len(block)] = block, only the rows of `mask` (all when None)."""
  if mask is not None:
    block = jnp.where(mask, block, jax.lax.dynamic_slice_in_dim(buf, first, block.shape[0]))
  return jax.lax.dynamic_update_slice_in_dim(buf, block.astype(buf.dtype), first, 0)


@functools.lru_cache(maxsize=None)
def _block_mlp(tile: int, min_tile: int, activation: str, glu: bool):
  """The custom-VJP block loop for one (tile, min_tile, activation, glu).

  Loops over experts; an expert's rows run as full blocks of `tile` rows and one block
  for the remainder, its height rounded up to a multiple of `min_tile` and its extra
  rows masked (`lax.switch` over the tile/min_tile heights): no row is padded, no block
  holds another expert's rows, and an expert with fewer than `tile` rows is one block.
  The backward pass takes an expert's weight gradients from its remainder block (no
  zero-filled accumulator) and adds the full blocks' to them; they are written once.
  """
  act = ACTIVATIONS[activation]
  heights = [c * min_tile for c in range(1, tile // min_tile + 1)]

  def forward(p, x, sizes):
    length, hidden = x.shape[0], p['w_in'].shape[-1]
    offsets = jnp.cumsum(sizes) - sizes

    def body(pe, size, pos, valid, carry):
      y, h_all, g_all = carry
      first, mask = _block_start(pos, valid, size, length)
      xb = jax.lax.dynamic_slice_in_dim(x, first, size)
      h = _mm(xb, pe['w_in']) + pe['b_in'] if 'b_in' in pe else _mm(xb, pe['w_in'])
      gate = _mm(xb, pe['w_gate']) if glu else None
      a = act(gate) * h if glu else act(h)
      yb = _mm(a.astype(x.dtype), pe['w_out'])
      yb = yb + pe['b_out'] if 'b_out' in pe else yb
      y, h_all = _write(y, yb, first, mask), _write(h_all, h, first, mask)
      if glu:
        g_all = _write(g_all, gate, first, mask)
      return y, h_all, g_all

    def per_expert(e, carry):
      pe = {k: v[e].astype(x.dtype) for k, v in p.items()}
      start = offsets[e]
      nfull, pos, rest, cls = _split(tile, min_tile, start, sizes[e])
      carry = _remainder(cls, heights, lambda h, c: body(pe, h, pos, rest, c), carry)
      return jax.lax.fori_loop(0, nfull, lambda b, c: body(pe, tile, start + b * tile, None, c),
                               carry)

    # The loop's buffers are float32, as the matmuls return them: XLA:CPU converts
    # f32 -> bf16 slowly, and a converting update of a bf16 buffer is not in place.
    zeros = lambda n: _varying_like(jnp.zeros((length, n), jnp.float32), p, x, sizes)
    carry = (zeros(p['w_out'].shape[-1]), zeros(hidden), zeros(hidden) if glu else None)
    y, h_all, g_all = jax.lax.fori_loop(0, sizes.shape[0], per_expert, carry)
    return y.astype(x.dtype), h_all, g_all

  @jax.custom_vjp
  def mlp(p, x, sizes):
    return forward(p, x, sizes)[0]

  def mlp_fwd(p, x, sizes):
    y, h_all, g_all = forward(p, x, sizes)
    return y, (p, x, sizes, h_all, g_all)

  def mlp_bwd(res, dy):
    p, x, sizes, h_all, g_all = res
    length, cd = x.shape[0], x.dtype
    acc_dtype = lambda w: jnp.promote_types(w.dtype, jnp.float32)
    offsets = jnp.cumsum(sizes) - sizes

    def body(pe, size, pos, valid, dx):
      """-> (dx with the block's rows written, the block's weight gradients)."""
      first, mask = _block_start(pos, valid, size, length)
      sl = lambda a: jax.lax.dynamic_slice_in_dim(a, first, size)
      # Rows of a masked block that are not the expert's may hold anything (another
      # expert's rows, unwritten rows): zero them so that 0 * inf cannot reach a sum.
      clean = (lambda a: a) if mask is None else (lambda a: jnp.where(mask, a, 0))
      xb, dyb = clean(sl(x)), clean(sl(dy))
      h = clean(sl(h_all)).astype(jnp.float32)
      if glu:
        ga, gate_vjp = jax.vjp(act, clean(sl(g_all)).astype(jnp.float32))
        a = ga * h
      else:
        a, act_vjp = jax.vjp(act, h)
      upd = {'w_out': _mm(a.astype(cd).T, dyb)}
      da = _mm(dyb, pe['w_out'].T)
      dh32 = da * ga if glu else act_vjp(da)[0]
      dh = dh32.astype(cd)
      if glu:
        dgate = gate_vjp(da * h)[0].astype(cd)
        upd['w_gate'] = _mm(xb.T, dgate)
        dxb = _mm(dh, pe['w_in'].T) + _mm(dgate, pe['w_gate'].T)
      else:
        dxb = _mm(dh, pe['w_in'].T)
      upd['w_in'] = _mm(xb.T, dh)
      if 'b_in' in pe:
        upd['b_in'] = jnp.sum(dh32, axis=0)
      if 'b_out' in pe:
        upd['b_out'] = jnp.sum(dyb, axis=0, dtype=jnp.float32)
      upd = {k: upd[k].astype(acc_dtype(pe[k])) for k in pe}
      return _write(dx, dxb, first, mask), upd

    def per_expert(e, carry):
      pe = {k: v[e].astype(x.dtype) for k, v in p.items()}
      start, n = offsets[e], sizes[e]
      nfull, pos, rest, cls = _split(tile, min_tile, start, n)

      def put(grads, upd, add):
        """grads[e] = upd, or grads[e] + upd where `add` (a traced bool)."""
        out = {}
        for k, g in grads.items():
          old = jax.lax.dynamic_index_in_dim(g, e, 0, keepdims=False)
          out[k] = jax.lax.dynamic_update_index_in_dim(
              g, jnp.where(add, old + upd[k], upd[k]), e, 0)
        return out

      def rest_block(h, carry):
        dx, upd = body(pe, h, pos, rest, carry[0])
        return dx, put(carry[1], upd, False)

      def full(b, carry):
        dx, upd = body(pe, tile, start + b * tile, None, carry[0])
        return dx, put(carry[1], upd, (b > 0) | (cls > 0))

      # The remainder block writes the expert's gradients and the full blocks add to
      # them (the first writes when there is no remainder): no accumulator to zero-fill,
      # and every branch updates dx and grads in place.
      carry = _remainder(cls, heights, rest_block, carry)
      carry = jax.lax.fori_loop(0, nfull, full, carry)
      no_rows = lambda c: (c[0], put(c[1], {k: jnp.zeros(v.shape, c[1][k].dtype)
                                            for k, v in pe.items()}, False))
      return jax.lax.cond(n == 0, no_rows, lambda c: c, carry)

    grads0 = {k: _varying_like(jnp.zeros(v.shape, acc_dtype(v)), p, x, dy, sizes)
              for k, v in p.items()}
    dx0 = _varying_like(jnp.zeros(x.shape, jnp.float32), p, x, dy, sizes)
    dx, grads = jax.lax.fori_loop(0, sizes.shape[0], per_expert, (dx0, grads0))
    return ({k: _sum_to(grads[k].astype(p[k].dtype), p[k]) for k in grads},
            _sum_to(dx.astype(x.dtype), x), None)

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
                glu: bool = False, impl: str = 'auto', tile: int | None = None,
                min_tile: int | None = None) -> Array:
  """Every row through the MLP of its expert.

  Args:
    params: 'w_in' [E, d, h], 'w_out' [E, h, d], optional 'w_gate' [E, d, h] (GLU),
      'b_in' [E, h], 'b_out' [E, d]; the matmuls run in x's dtype ('blocks' casts
      each expert's slice, so bf16 experts keep float32 weights and gradients).
    x: [L, d] rows grouped by expert: expert e owns the `group_sizes[e]` rows after
      those of experts < e; rows past Σ group_sizes are ignored.
    group_sizes: [E] int32 rows per expert.
    activation, glu: the expert MLP (see `Experts`).
    impl: 'ragged', 'blocks', or 'auto' (`default_impl()`).
    tile, min_tile: 'blocks' runs an expert's rows in blocks of `tile` rows and its
      remainder in one block of a multiple of `min_tile` rows (powers of two, at most
      L; None: `default_tiles(L, E)`).

  Returns:
    [L, d]; rows past Σ group_sizes hold unspecified values.
  """
  if impl == 'auto':
    impl = default_impl()
  if impl not in IMPLS:
    raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}.')
  p = {k: v for k, v in params.items() if v is not None}
  if glu != ('w_gate' in p):
    raise ValueError(f'glu={glu} but params {"have" if "w_gate" in p else "lack"} w_gate.')
  if impl == 'ragged':
    return _ragged_mlp({k: v.astype(x.dtype) for k, v in p.items()}, x, group_sizes,
                       activation, glu)
  auto_tile, auto_min = default_tiles(x.shape[0], group_sizes.shape[0])
  tile, min_tile = int(tile or auto_tile), int(min_tile or auto_min)
  if tile < 1 or min_tile < 1 or tile & (tile - 1) or min_tile & (min_tile - 1):
    raise ValueError(f'impl="blocks" needs powers of two tile and min_tile, got {tile}, '
                     f'{min_tile}.')
  length = x.shape[0]
  if not length:
    return x
  cap = 1 << (length.bit_length() - 1)       # blocks must fit in the rows
  tile = min(tile, cap)
  min_tile = min(min_tile, tile)
  return _block_mlp(tile, min_tile, activation, bool(glu))(p, x, group_sizes.astype(jnp.int32))

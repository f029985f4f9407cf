"""Dropless expert parallelism: a ragged exchange of expert-sorted rows.

The dropless engine has no capacity: each device holds `T` rows (token copies) sorted
by global expert id with `group_sizes [E]` rows per expert, and expert e lives on
device `e // (E / n)` of the `expert` axis (size n). `ragged_dispatch` sends each
expert's rows to its device and returns them grouped by local expert, ready for
`jax.lax.ragged_dot(rows, w_local, local_sizes)`; `ragged_return` brings the results
back to the sender's original row order.

    rows, local_sizes, plan = ragged_dispatch(x_sorted, group_sizes, axis_name='expert')
    out = jax.lax.ragged_dot(rows, w_in_local, local_sizes)   # ... the expert MLP
    y_sorted = ragged_return(out, plan)                          # [T, d'] in x_sorted order

Implementations (`impl`), all with identical results:
  * 'ragged': `jax.lax.ragged_all_to_all`, one slice per (device, expert): moves only
    the real rows. GPU/TPU only: XLA:CPU cannot compile it.
  * 'padded': per-destination chunks padded to T rows and `jax.lax.all_to_all`; runs
    everywhere (the CPU fallback), moves n·T rows per device.
  * 'emulated': `ragged_all_to_all`'s documented semantics written with `all_gather`,
    so the offsets given to the 'ragged' path can be checked on CPU.
  * 'auto': 'ragged' on GPU/TPU, 'padded' on CPU.

The receive buffer has R = n·T rows (every row of every device could pick one device's
experts), so nothing is ever dropped; rows past `sum(local_sizes)` are zeros.
Call inside `jax.shard_map` with `axis_name` manual.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RaggedPlan:
  """What `ragged_return` needs to undo `ragged_dispatch` (all int32)."""
  impl: str = dataclasses.field(metadata=dict(static=True))
  axis_name: str = dataclasses.field(metadata=dict(static=True))
  group_sizes: Array          # [E] rows per global expert on this device (sender side)
  input_offsets: Array        # [E] where each expert's rows start in x_sorted
  recv_sizes: Array           # [E] as (source s, local expert) : rows received
  recv_offsets: Array         # [E] as (source s, local expert) : where they sit in `rows`
  sender_offsets: Array       # [E] as (source s, local expert) : where they came from on s


def _exclusive_cumsum(x: Array) -> Array:
  return jnp.cumsum(x) - x


def _a2a(x: Array, axis_name: str) -> Array:
  """[n·m, ...] -> [n·m, ...]: block j goes to device j, blocks arrive in source order."""
  return lax.all_to_all(x, axis_name, 0, 0, tiled=True)


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  """`lax.ragged_all_to_all` semantics (its docstring) with all_gather; for CPU tests.

  Slice i of the caller (`operand[input_offsets[i]:+send_sizes[i]]`) goes to device
  `i // (N / n)` and is written there at `output_offsets[i]`.
  """
  del recv_sizes   # implied by the senders' send_sizes
  n = lax.axis_size(axis_name)
  me = lax.axis_index(axis_name)
  per_dev = input_offsets.shape[0] // n
  ops = lax.all_gather(operand, axis_name)                 # [n, rows, ...]
  ins, sizes, outs = (lax.all_gather(a, axis_name) for a in
                      (input_offsets, send_sizes, output_offsets))   # [n, N]
  rows = jnp.arange(output.shape[0])
  for src in range(n):
    for j in range(per_dev):
      i = me * per_dev + j                                 # the slices src sends to me
      start, size, where = ins[src, i], sizes[src, i], outs[src, i]
      hit = (rows >= where) & (rows < where + size)
      vals = ops[src][jnp.clip(rows - where + start, 0, operand.shape[0] - 1)]
      output = jnp.where(hit.reshape((-1,) + (1,) * (output.ndim - 1)), vals, output)
  return output


def _exchange(impl, operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
              axis_name):
  if impl == 'ragged':
    return lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                 recv_sizes, axis_name=axis_name)
  return ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets,
                                    recv_sizes, axis_name=axis_name)


def _slice_rows(sizes: Array, offsets: Array, t: int) -> Array:
  """Row i of a chunk that concatenates slices (sizes, offsets: [per_dev]) -> its offset
  position `offsets[k] + i - start_k`, or -1 past the chunk's end.  [t]"""
  i = jnp.arange(t)
  ends = jnp.cumsum(sizes)
  k = jnp.searchsorted(ends, i, side='right')
  kc = jnp.minimum(k, sizes.shape[0] - 1)
  return jnp.where(k < sizes.shape[0], offsets[kc] + i - (ends - sizes)[kc], -1)


def _padded_exchange(operand, num_out, input_offsets, send_sizes, output_offsets, recv_sizes,
                     axis_name, chunk):
  """The same slice exchange with fixed-size all_to_all chunks (runs on CPU).

  The slices to device j are concatenated into one chunk padded to `chunk` rows (an
  upper bound of what one device sends another: T), one `all_to_all` moves the chunks,
  and the receiver writes each row where its slice's output offset says.
  """
  n = lax.axis_size(axis_name)
  t = chunk
  per_dev = input_offsets.shape[0] // n
  src = jax.vmap(_slice_rows, (0, 0, None))(send_sizes.reshape(n, per_dev),
                                            input_offsets.reshape(n, per_dev), t)   # [n, T]
  chunks = jnp.where((src >= 0).reshape(n, t, *([1] * (operand.ndim - 1))),
                     operand[jnp.maximum(src, 0)], 0)                            # [n, T, ...]
  got = _a2a(chunks.reshape((n * t,) + operand.shape[1:]), axis_name)           # by source
  out_off = _a2a(output_offsets, axis_name).reshape(n, per_dev)
  dst = jax.vmap(_slice_rows, (0, 0, None))(recv_sizes.reshape(n, per_dev), out_off, t)
  dst = jnp.where(dst >= 0, dst, num_out).reshape(-1)                          # pad -> dropped
  out = jnp.zeros((num_out,) + operand.shape[1:], operand.dtype)
  return out.at[dst].set(got, mode='drop')


EXCHANGE_IMPLS = ('auto', 'ragged', 'padded', 'emulated')


def check_impl(impl: str) -> None:
  """Validates an exchange name without touching the backend (safe at import time, before
  `jax.distributed.initialize`)."""
  if impl not in EXCHANGE_IMPLS:
    raise ValueError(f"impl must be 'auto', 'ragged', 'padded' or 'emulated', got {impl!r}.")


def resolve_impl(impl: str) -> str:
  check_impl(impl)
  if impl == 'auto':
    return 'padded' if jax.default_backend() == 'cpu' else 'ragged'
  return impl


def ragged_dispatch(x_sorted: Array, group_sizes: Array, *, axis_name: str = 'expert',
                    impl: str = 'auto') -> tuple[Array, Array, RaggedPlan]:
  """Sends each expert's rows to the device holding it.

  Args:
    x_sorted: [T, d] this device's rows sorted by global expert id (padding rows, if
      any, after the last expert's rows: they are not sent).
    group_sizes: [E] int, rows per global expert (sum <= T); E divisible by n.
    axis_name: the mesh axis the experts are split over.
    impl: 'auto', 'ragged', 'padded' or 'emulated' (module docstring).

  Returns:
    rows: [n·T, d] received rows grouped by local expert (then by source device),
      zeros after `sum(local_sizes)`.
    local_sizes: [E/n] int32 rows per local expert.
    plan: for `ragged_return`.
  """
  impl = resolve_impl(impl)
  n = lax.axis_size(axis_name)
  t = x_sorted.shape[0]
  num_experts = group_sizes.shape[0]
  if num_experts % n:
    raise ValueError(f'{num_experts} experts do not divide over axis {axis_name!r} of size {n}.')
  e_loc = num_experts // n
  group_sizes = group_sizes.astype(jnp.int32)
  input_offsets = _exclusive_cumsum(group_sizes)
  # (source s, local expert l) -> rows s sends me for my expert l.
  recv_sizes = _a2a(group_sizes, axis_name)
  counts = recv_sizes.reshape(n, e_loc)
  # Received rows are grouped by local expert, then by source: offsets of (l, s).
  recv_offsets = _exclusive_cumsum(counts.T.reshape(-1)).reshape(e_loc, n).T.reshape(-1)
  output_offsets = _a2a(recv_offsets, axis_name)   # where my slice e lands on its device
  sender_offsets = _a2a(input_offsets, axis_name)  # where (s, l) rows sit on source s
  num_out = n * t
  if impl == 'padded':
    rows = _padded_exchange(x_sorted, num_out, input_offsets, group_sizes, output_offsets,
                            recv_sizes, axis_name, t)
  else:
    rows = _exchange(impl, x_sorted, jnp.zeros((num_out,) + x_sorted.shape[1:], x_sorted.dtype),
                     input_offsets, group_sizes, output_offsets, recv_sizes, axis_name)
  plan = RaggedPlan(impl=impl, axis_name=axis_name, group_sizes=group_sizes,
                    input_offsets=input_offsets, recv_sizes=recv_sizes,
                    recv_offsets=recv_offsets, sender_offsets=sender_offsets)
  return rows, counts.sum(axis=0), plan


def ragged_return(y_rows: Array, plan: RaggedPlan) -> Array:
  """Inverse of `ragged_dispatch`: y_rows [n·T, d'] -> [T, d'] in x_sorted's row order.

  Rows of x_sorted that were not sent (padding past sum(group_sizes)) come back zero.
  """
  n = lax.axis_size(plan.axis_name)
  t = y_rows.shape[0] // n
  args = (plan.recv_offsets, plan.recv_sizes, plan.sender_offsets, plan.group_sizes)
  if plan.impl == 'padded':
    return _padded_exchange(y_rows, t, *args, plan.axis_name, t)
  out = jnp.zeros((t,) + y_rows.shape[1:], y_rows.dtype)
  return _exchange(plan.impl, y_rows, out, *args, plan.axis_name)

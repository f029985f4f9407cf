"""Row gathers whose backward pass is also a gather.

`x[idx]` differentiates into a scatter-add, which XLA:CPU runs as a serial loop and
GPUs run with atomics. When every destination row has at most a few known sources (a
token has K slots; a slot has at most one token), the inverse map is at hand and the
backward pass can gather instead. Engines build both maps from the `Routing`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def take_rows(x: Array, idx: Array) -> Array:
  """x: [n, d], idx: [...] int in [0, n] -> [..., d]; index n (or more) reads zeros."""
  return jnp.take(x, idx, axis=0, mode='fill', fill_value=0)


@jax.custom_vjp
def gather_rows(x: Array, idx: Array, inverse: Array) -> Array:
  """`out[i] = x[idx[i]]`, zero where `idx[i] >= n`, with a gather as backward pass.

  Args:
    x: [n, d] rows.
    idx: [m] int32, source row of each output row; `n` marks an empty output row.
    inverse: [n, K] int32, for each source row j the output rows i with `idx[i] == j`,
      padded with `m`. Must be exact: every such i listed once, nothing else.

  Returns:
    [m, d]. The cotangent of x is `dx[j] = Σ_k dout[inverse[j, k]]`.
  """
  return take_rows(x, idx)


def _gather_rows_fwd(x, idx, inverse):
  return take_rows(x, idx), (idx, inverse)


def _gather_rows_bwd(res, dout):
  idx, inverse = res
  dx = jnp.sum(take_rows(dout, inverse), axis=1)      # [n, K, d] -> [n, d]
  return dx, None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)

"""What an MoE layer step could cost at best on this machine: the probes of the roofline.

`scripts/benchmark_layers.py` times these probes alternately with the MoE step and the
dense MLP of each row (same load on all), and adds

    roofline = E · expert_mlp(R rows)       every expert's forward+backward MLP on its
                                            R = T·k/E rows (T·/E for Soft MoE), weights in
                                            cache: the matmul speed at that row count
             + weight_traffic(E experts)    read the weights twice (forward, backward),
                                            write their gradients once, from/to memory
             + other matmuls / dense rate   Soft MoE's logits, dispatch and combine
                                            einsums at the dense MLP's measured FLOP/s

so each row shows the best time physically possible here and the share of it the
engine reaches (roofline / measured). Nothing below depends on the engines.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def mlp_flops(rows: int, d: int, h: int) -> int:
  """Forward+backward FLOPs of one MLP d -> h -> d on `rows` rows (3x the forward)."""
  return 3 * 2 * 2 * rows * d * h


def expert_mlp_probe(rows: int, d: int, h: int, dtype, *, target_rows: int = 4096):
  """A jitted function running forward+backward of one expert MLP (biases, gelu) on
  `rows` rows, n times over fresh rows with the same weights (in cache, as when an
  engine runs one expert's rows), accumulating the weight gradients like a block loop.

  Returns (fn, n): call `fn()`; its time / n is one expert's forward+backward.
  """
  n = max(1, -(-target_rows // rows))
  kx, kw1, kw2, kc = jax.random.split(jax.random.key(7), 4)
  x = jax.random.normal(kx, (n * rows, d), dtype)
  ct = jax.random.normal(kc, (n * rows, d), dtype)
  p = dict(w_in=(jax.random.normal(kw1, (d, h)) / d ** 0.5).astype(dtype),
           b_in=jnp.zeros((h,), dtype),
           w_out=(jax.random.normal(kw2, (h, d)) / h ** 0.5).astype(dtype),
           b_out=jnp.zeros((d,), dtype))

  def loss(p, xb, cb):
    hid = jax.nn.gelu(xb @ p['w_in'] + p['b_in'])
    return jnp.sum((hid @ p['w_out'] + p['b_out']) * cb)

  @jax.jit
  def run(p, x, ct):
    def body(i, carry):
      acc, dx_out = carry
      xb = jax.lax.dynamic_slice_in_dim(x, i * rows, rows)
      cb = jax.lax.dynamic_slice_in_dim(ct, i * rows, rows)
      gp, gx = jax.grad(loss, argnums=(0, 1))(p, xb, cb)
      acc = jax.tree.map(jnp.add, acc, gp)
      return acc, jax.lax.dynamic_update_slice_in_dim(dx_out, gx, i * rows, 0)
    zero = jax.tree.map(jnp.zeros_like, p)
    return jax.lax.fori_loop(0, n, body, (zero, jnp.zeros_like(x)))

  return (lambda: run(p, x, ct)), n


def weight_traffic_probe(num_params: int, dtype):
  """A jitted function with the memory traffic an MoE step must spend on its expert
  weights: reads `num_params` values twice (forward and backward read the weights) and
  writes `num_params` (their gradients), in one streaming pass."""
  k1, k2 = jax.random.split(jax.random.key(8))
  a = jax.random.normal(k1, (num_params,), dtype)
  b = jax.random.normal(k2, (num_params,), dtype)
  run = jax.jit(lambda a, b: a + b)
  return lambda: run(a, b)

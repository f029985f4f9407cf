"""`Experts`: E independent MLPs applied to an expert buffer in one batched call."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.engines.grouped import grouped_mlp
from moe_jax.parallel.sharding import sharded_param

Array = jax.Array

ACTIVATIONS = {'gelu': jax.nn.gelu, 'relu': jax.nn.relu, 'silu': jax.nn.silu}
PARAM_NAMES = ('w_in', 'w_gate', 'w_out', 'b_in', 'b_out')


def expert_kernel_init(scale: float = 1.0):
  """LeCun-normal per expert: fan-in of one expert's [d_in, d_out] matrix, axis 0 is E.

  Every element is an independent draw, so experts start different (vmoe shares one
  initialisation across experts; we do not).
  """
  return jax.nn.initializers.variance_scaling(scale, 'fan_in', 'truncated_normal',
                                              in_axis=-2, out_axis=-1, batch_axis=(0,))


class Experts(nnx.Module):
  """E MLPs with stacked weights.

  `y = W_out · act(W_in · x + b_in) + b_out`, or with `glu=True`
  `y = W_out · (act(W_gate · x) * (W_in · x)) + b_out` (GEGLU / SwiGLU, Shazeer 2020).

  Params: `w_in` [E, d, h], `w_gate` [E, d, h] (GLU only), `w_out` [E, h, d],
  `b_in` [E, h], `b_out` [E, d] (when `use_bias`). Each carries `out_sharding`
  metadata (E over the 'expert' mesh axis, h over 'model'): built under
  `jax.set_mesh(mesh)` it is created sharded, see `moe_jax.parallel.sharding`.
  `shard_experts=False` replicates them instead, with no annotation (e.g. always-on
  shared experts that run outside the expert-parallel exchange).
  """

  def __init__(self, num_experts: int, d_model: int, hidden: int, *, activation: str = 'gelu',
               glu: bool = False, use_bias: bool = True, dtype=None,
               param_dtype=jnp.float32, shard_experts: bool = True, rngs: nnx.Rngs):
    if activation not in ACTIVATIONS:
      raise ValueError(f'activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}')
    self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
    self.activation, self.glu, self.use_bias, self.dtype = activation, glu, use_bias, dtype
    init = expert_kernel_init()
    # Expert parallelism: E over the 'expert' mesh axis, h over 'model' (moe_jax.parallel).
    spec = lambda *axes: axes if shard_experts else None
    self.w_in = sharded_param(init(rngs.params(), (num_experts, d_model, hidden), param_dtype),
                              spec('expert', None, 'model'), what='experts.w_in')
    self.w_gate = (sharded_param(init(rngs.params(), (num_experts, d_model, hidden), param_dtype),
                                 spec('expert', None, 'model'), what='experts.w_gate')
                   if glu else nnx.data(None))
    self.w_out = sharded_param(init(rngs.params(), (num_experts, hidden, d_model), param_dtype),
                               spec('expert', 'model', None), what='experts.w_out')
    if use_bias:
      self.b_in = sharded_param(jnp.zeros((num_experts, hidden), param_dtype),
                                spec('expert', 'model'), what='experts.b_in')
      self.b_out = sharded_param(jnp.zeros((num_experts, d_model), param_dtype),
                                 spec('expert', None), what='experts.b_out')
    else:
      self.b_in = self.b_out = nnx.data(None)

  def apply_weights(self, params: dict, x: Array) -> Array:
    """The MLP on raw arrays (so parallel code can pass local shards).

    Args:
      params: dict with 'w_in', 'w_out' and optionally 'w_gate', 'b_in', 'b_out', each
        with a leading expert axis E' (all experts, or a device's local experts).
      x: [E', N, d] expert buffer.
    Returns:
      [E', N, d] in the compute dtype.
    """
    dtype = self.dtype or x.dtype
    act = ACTIVATIONS[self.activation]
    x = x.astype(dtype)
    # On CPU a bf16 matmul accumulates and returns float32: XLA:CPU runs that natively,
    # but turns a bf16 -> bf16 matmul into a float32 one with conversion passes over
    # both operands. Elsewhere (GPU, TPU) the matmuls stay in the compute dtype.
    acc = jnp.float32 if jax.default_backend() == 'cpu' else None
    mm = lambda eq, a, w: jnp.einsum(eq, a, w.astype(dtype), preferred_element_type=acc)
    h = mm('end,edh->enh', x, params['w_in'])
    if params.get('b_in') is not None:
      h = h + params['b_in'].astype(dtype)[:, None, :]
    if params.get('w_gate') is not None:
      h = act(mm('end,edh->enh', x, params['w_gate'])) * h
    else:
      h = act(h)
    y = mm('enh,ehd->end', h.astype(dtype), params['w_out'])
    if params.get('b_out') is not None:
      y = y + params['b_out'].astype(dtype)[:, None, :]
    return y.astype(dtype)

  def apply_grouped(self, params: dict, x: Array, group_sizes: Array, *, impl: str = 'auto',
                    tile: int | None = None, min_tile: int | None = None) -> Array:
    """The MLP on rows grouped by expert (dropless engine); see `engines.grouped`.

    Args:
      params: as in `apply_weights` (leading axis E).
      x: [L, d] rows grouped by expert, contiguous (expert e owns the
        `group_sizes[e]` rows after those of experts < e).
      group_sizes: [E] int32 rows per expert.
      impl, tile, min_tile: see `engines.grouped.grouped_mlp`.
    Returns:
      [L, d] in the compute dtype.
    """
    dtype = self.dtype or x.dtype
    p = {n: v for n, v in params.items() if v is not None}     # cast by grouped_mlp
    return grouped_mlp(p, x.astype(dtype), group_sizes, activation=self.activation, glu=self.glu,
                       impl=impl, tile=tile, min_tile=min_tile)

  def params_dict(self) -> dict:
    """{name: array} of the parameters present ('w_in', 'w_gate', 'w_out', 'b_in', 'b_out')."""
    return {n: getattr(self, n)[...] for n in PARAM_NAMES if getattr(self, n) is not None}

  def param_specs(self) -> dict:
    """{name: mesh-axis annotation} of the same parameters (their `out_sharding`
    metadata, e.g. ('expert', None, 'model'); None when replicated)."""
    return {n: getattr(self, n).get_metadata().get('out_sharding') for n in PARAM_NAMES
            if getattr(self, n) is not None}

  def __call__(self, x: Array) -> Array:
    """x: [E, N, d] -> [E, N, d]."""
    return self.apply_weights(self.params_dict(), x)

  def flops_per_token(self) -> int:
    """Multiply-add FLOPs (×2) of one expert on one token, forward."""
    mats = 3 if self.glu else 2
    return 2 * mats * self.d_model * self.hidden

"""DSelect-k router module (Hazimeh et al. 2021); math in `routing/dselect_k.py`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.moe_config import LayerContext
from moe_jax.layers.routers.base import Router
from moe_jax.routing import CapacitySpec
from moe_jax.routing import dselect_k as dselect_lib
from moe_jax.routing.capacity import EVAL_CAPACITY_KWARGS

Array = jax.Array
GATES = ('per_token', 'static')


def symmetric_uniform(limit: float):
  """U(-limit, limit), the initialiser of the official code (Keras RandomUniform)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -limit, limit)
  return init


class DSelectKRouter(Router):
  """DSelect-k: k smooth binary-code selectors, dense in training, sparse at evaluation.

  Params, per-token gate (the paper's per-example gate; default):
    `z_kernel` [d, k·m], `z_bias` [k·m]  init U(-γ/100, γ/100)  (z = x·W + b, m = ceil(log2 E))
    `w_kernel` [d, k],   `w_bias` [k]    init U(-0.05, 0.05)    (selector weight logits)
  Static gate (the paper's task-only gate: one q for every token):
    `z_logits` [k, m] init U(-γ/100, γ/100), `w_logits` [k] init U(-0.05, 0.05).

  Training evaluates every expert (weights q, no drops). In eval mode each token goes
  to the experts of its top-k q entries with q > 0 (exact once the selectors are
  binary); `eval_sparse=False` keeps the dense routing at evaluation too.

  router_kwargs:
    k: selectors = maximum experts per token at convergence (default 2).
    gamma: smooth-step width γ (default 1.0, the code's default).
    gate: 'per_token' (default) or 'static'.
    entropy_weight: λ of the entropy regulariser (default 1e-6; mean over tokens).
    reachability_weight: coefficient of Σ 1/Σ_e r when E is not a power of 2 (1.0).
    eval_sparse: route to the selected experts only at evaluation (default True).
    eval_capacity_factor (and the other evaluation capacity keywords): none (default)
      gives C = S at evaluation, so nothing is ever dropped, but the einsum/gather
      engines still run E·S slots (the empty ones on zeros); eval_capacity_factor gives
      C = ceil(k·S·cf/E): k/E of the dense cost, drops possible.
  Aux losses are reported in both modes (the official code adds them in training only;
  trainers add aux losses in training only).
  Causal: yes (each token's weights depend on that token only, or on nothing).
  """
  routing_fn = staticmethod(dselect_lib.dselect_k)
  set_by_router = ('num_experts', 'sparse')
  default_capacity = CapacitySpec()
  capacity_kwargs = EVAL_CAPACITY_KWARGS
  causal = True

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs,
               context: LayerContext | None = None, k: int = 2, gamma: float = 1.0,
               gate: str = 'per_token', eval_sparse: bool = True, **kwargs):
    if not 1 <= k:
      raise ValueError(f'dselect_k needs k >= 1 selectors, got k={k}.')
    if gate not in GATES:
      raise ValueError(f'gate must be one of {GATES}, got {gate!r}.')
    if gamma <= 0:
      raise ValueError(f'gamma must be > 0, got {gamma}.')
    m = dselect_lib.num_code_bits(num_experts)
    self.k, self.m, self.gamma, self.gate_kind = k, m, gamma, gate
    self.eval_sparse = eval_sparse
    z_init, w_init = symmetric_uniform(gamma / 100), symmetric_uniform(0.05)
    if gate == 'per_token':
      # Kernel and bias share one draw per map (same distribution, one compiled sampler).
      z = z_init(rngs.params(), (d_model + 1, k * m))
      w = w_init(rngs.params(), (d_model + 1, k))
      self.z_kernel, self.z_bias = nnx.Param(z[:-1]), nnx.Param(z[-1])
      self.w_kernel, self.w_bias = nnx.Param(w[:-1]), nnx.Param(w[-1])
    else:
      self.z_logits = nnx.Param(z_init(rngs.params(), (k, m)))
      self.w_logits = nnx.Param(w_init(rngs.params(), (k,)))
    super().__init__(d_model, num_experts, rngs=rngs, context=context, kwargs=kwargs)

  def selector_logits(self, x: Array) -> tuple[Array, Array]:
    """x: [G, S, d] -> (z [G, S, k, m], w [G, S, k]) float32."""
    g, s, _ = x.shape
    if self.gate_kind == 'static':
      return (jnp.broadcast_to(self.z_logits[...], (g, s, self.k, self.m)),
              jnp.broadcast_to(self.w_logits[...], (g, s, self.k)))
    x = x.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    z = jnp.einsum('gsd,dj->gsj', x, self.z_kernel[...], precision=hi) + self.z_bias[...]
    w = jnp.einsum('gsd,dk->gsk', x, self.w_kernel[...], precision=hi) + self.w_bias[...]
    return z.reshape(g, s, self.k, self.m), w

  def __call__(self, x: Array, *, token_ids: Array | None = None):
    z, w = self.selector_logits(x)
    sparse = self.deterministic and self.eval_sparse
    capacity = self.slots(x.shape[1], min(self.k, self.num_experts)) if sparse else None
    return dselect_lib.dselect_k(z, w, num_experts=self.num_experts, gamma=self.gamma,
                                 sparse=sparse, capacity=capacity, **self.routing_kwargs)

"""Noisy top-k gating router (Shazeer et al. 2017), registry name 'noisy_top_k'."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.moe_config import LayerContext
from moe_jax.layers.routers.base import Router, check_k
from moe_jax.routing import CapacitySpec, Routing
from moe_jax.routing.noisy_top_k import noisy_top_k

Array = jax.Array


class NoisyTopKRouter(Router):
  """H = x·W_g + ε·(softplus(x·W_noise) + 1e-2); gates = softmax over the top-k of H.

  Params: `w_gate` W_g [d, E] and `w_noise` W_noise [d, E], both zero-initialised as in
  the paper (the layer starts with uniform logits plus noise of std ≈ 0.70, so the initial
  load is random and balanced). Noise only in training; evaluation routes on the clean
  logits (`module.eval()`). Causal.

  router_kwargs:
    k: experts per token (default 4, the paper's language models; t2t uses 2).
    noisy: learned noise on (default True); False gives plain softmax top-k over the k.
    noise_epsilon: added to the softplus std (1e-2, t2t).
    importance_weight, load_weight: w_importance, w_load (default 0.1 each, paper App. A;
      t2t uses 1e-2 for both).
    the capacity keywords: none by default = C = S, nothing dropped, as in the paper,
      which has no capacity; capacity_factor gives C = ceil(k·S·cf/E) for a fixed
      compute budget.
  """
  routing_fn = staticmethod(noisy_top_k)
  default_capacity = CapacitySpec()

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs,
               context: LayerContext | None = None, k: int = 4, noisy: bool = True, **kwargs):
    self.k = check_k(k, num_experts)
    self.noisy = noisy
    self.w_gate = nnx.Param(jnp.zeros((d_model, num_experts), jnp.float32))
    self.w_noise = (nnx.Param(jnp.zeros((d_model, num_experts), jnp.float32)) if noisy
                    else nnx.data(None))
    super().__init__(d_model, num_experts, rngs=rngs, context=context, kwargs=kwargs,
                     stochastic=noisy)

  def __call__(self, x: Array, *, token_ids: Array | None = None) -> Routing:
    """x: [G, S, d] -> Routing."""
    x = x.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    clean = jnp.einsum('gsd,de->gse', x, self.w_gate[...], precision=hi)
    raw_noise = normal = None
    if self.noisy and not self.deterministic:
      raw_noise = jnp.einsum('gsd,de->gse', x, self.w_noise[...], precision=hi)
      normal = jax.random.normal(self.rngs(), clean.shape, jnp.float32)
    return noisy_top_k(clean, raw_noise, normal, k=self.k, capacity=self.slots(x.shape[1], self.k),
                       **self.routing_kwargs)

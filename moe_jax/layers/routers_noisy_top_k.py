"""Noisy top-k gating router (Shazeer et al. 2017), registry name 'noisy_top_k'."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.router_kwargs import check_routing_kwargs
from moe_jax.layers.routers import Router
from moe_jax.routing import Routing
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
    capacity_factor: None (default): C = S, nothing dropped, as in the paper, which has no
      capacity; a number gives C = ceil(k·S·cf/E) for a fixed compute budget.
    eval_capacity_factor: at evaluation (default: same as training).
    and the capacity keywords of `routing.noisy_top_k.noisy_top_k` (capacity,
    capacity_include_k, capacity_rounding, capacity_multiple_of, min_capacity).
  """
  routing_fn = staticmethod(noisy_top_k)

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs, k: int = 4,
               noisy: bool = True, noise_epsilon: float = 1e-2,
               importance_weight: float = 0.1, load_weight: float = 0.1,
               capacity_factor: float | None = None, eval_capacity_factor: float | None = None,
               **routing_kwargs):
    if not 1 <= k <= num_experts:
      raise ValueError(f'noisy_top_k: k={k} must be between 1 and num_experts={num_experts}.')
    self.k, self.noisy, self.noise_epsilon = k, noisy, noise_epsilon
    self.importance_weight, self.load_weight = importance_weight, load_weight
    self.capacity_factor = capacity_factor
    self.eval_capacity_factor = (capacity_factor if eval_capacity_factor is None
                                 else eval_capacity_factor)
    self.routing_kwargs = check_routing_kwargs(
        noisy_top_k, routing_kwargs, 'noisy_top_k',
        reserved=('k', 'noise_epsilon', 'importance_weight', 'load_weight', 'capacity_factor'))
    self.w_gate = nnx.Param(jnp.zeros((d_model, num_experts), jnp.float32))
    self.w_noise = (nnx.Param(jnp.zeros((d_model, num_experts), jnp.float32)) if noisy
                    else nnx.data(None))
    self.deterministic = False
    self.rngs = rngs['gating'].fork() if noisy else nnx.data(None)

  def __call__(self, x: Array, *, token_ids: Array | None = None) -> Routing:
    """x: [G, S, d] -> Routing."""
    x = x.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    clean = jnp.einsum('gsd,de->gse', x, self.w_gate[...], precision=hi)
    raw_noise = normal = None
    if self.noisy and not self.deterministic:
      raw_noise = jnp.einsum('gsd,de->gse', x, self.w_noise[...], precision=hi)
      normal = jax.random.normal(self.rngs(), clean.shape, jnp.float32)
    cf = self.eval_capacity_factor if self.deterministic else self.capacity_factor
    return noisy_top_k(clean, raw_noise, normal, k=self.k, noise_epsilon=self.noise_epsilon,
                       importance_weight=self.importance_weight, load_weight=self.load_weight,
                       capacity_factor=cf, **self.routing_kwargs)

"""Softmax top-k token choice behind a linear gate (`routing.tokens_choice`); registry
name 'tokens_choice'."""
from __future__ import annotations

import jax
from flax import nnx

from moe_jax import routing
from moe_jax.layers.routers.base import Router, check_k
from moe_jax.routing import CapacitySpec

Array = jax.Array


class TokensChoiceRouter(Router):
  """Softmax top-k token choice (`routing.tokens_choice`) behind a linear gate.

  router_kwargs: `k` (default 1), `noise_std`, `init_scale`, the capacity keywords
  (capacity_factor 1.25; Switch/ST-MoE use eval_capacity_factor 2.0, default: as in
  training), and the other keywords of `routing.tokens_choice` (batch_priority,
  renormalize, loss weights, balance_count). Causal unless `batch_priority`.
  """
  routing_fn = staticmethod(routing.tokens_choice)
  default_capacity = CapacitySpec(capacity_factor=1.25)

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs, context=None,
               k: int = 1, noise_std: float = 0.0, init_scale: float = 0.1, **kwargs):
    self.k = check_k(k, num_experts)
    super().__init__(d_model, num_experts, rngs=rngs, context=context, kwargs=kwargs,
                     gate_init_scale=init_scale, noise_std=noise_std)

  @property
  def is_causal(self) -> bool:
    return not self.routing_kwargs.get('batch_priority', False)

  def __call__(self, x: Array, *, token_ids: Array | None = None) -> routing.Routing:
    logits = self.add_noise(self.gate(x))
    return routing.tokens_choice(logits, k=self.k, capacity=self.slots(x.shape[1], self.k),
                                 **self.routing_kwargs)

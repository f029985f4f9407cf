"""Expert choice (Zhou et al. 2022) behind a linear gate (`routing.experts_choice`);
registry name 'experts_choice'."""
from __future__ import annotations

import jax
from flax import nnx

from moe_jax import routing
from moe_jax.layers.routers.base import Router
from moe_jax.routing import CapacitySpec

Array = jax.Array


class ExpertsChoiceRouter(Router):
  """Expert choice (`routing.experts_choice`) behind a linear gate. Not causal.

  router_kwargs: the capacity keywords (capacity_factor 2.0, the paper's EC-CF2),
  `noise_std`, `init_scale`, and the keywords of `routing.experts_choice`.
  """
  routing_fn = staticmethod(routing.experts_choice)
  default_capacity = CapacitySpec(capacity_factor=2.0)
  causal = False

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs, context=None,
               noise_std: float = 0.0, init_scale: float = 0.1, **kwargs):
    super().__init__(d_model, num_experts, rngs=rngs, context=context, kwargs=kwargs,
                     gate_init_scale=init_scale, noise_std=noise_std)

  def __call__(self, x: Array, *, token_ids: Array | None = None) -> routing.Routing:
    logits = self.add_noise(self.gate(x))
    return routing.experts_choice(logits, capacity=self.slots(x.shape[1]), **self.routing_kwargs)

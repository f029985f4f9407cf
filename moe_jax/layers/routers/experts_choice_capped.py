"""Capped expert choice router module (EC-CAP, Zhou et al. 2022 §3.3); math in
`routing/experts_choice_capped.py`; registry name 'experts_choice_capped'."""
from __future__ import annotations

import jax
from flax import nnx

from moe_jax.layers.moe_config import LayerContext
from moe_jax.layers.routers.base import Router
from moe_jax.routing import CapacitySpec
from moe_jax.routing.experts_choice_capped import experts_choice_capped

Array = jax.Array


class ExpertsChoiceCappedRouter(Router):
  """Expert choice whose assignment solves the entropy-regularised capped LP first.

  router_kwargs: the capacity keywords (capacity_factor 2.0, as EC), `noise_std`,
  `init_scale`, and the keywords of `routing.experts_choice_capped`:
  `max_experts_per_token` b (default 2: EC-CAP2; 3 gives EC-CAP3), `temperature` λ
  (0.003), `start_temperature` (0.3, annealed down to λ), `num_iters` (Dykstra sweeps,
  100), `enforce_cap` (False: the paper's plain top-C rounding; True: drop the picks
  beyond b per token), `z_loss_weight`. No aux loss by default.
  Not causal: each expert ranks every token of the group.
  """
  routing_fn = staticmethod(experts_choice_capped)
  default_capacity = CapacitySpec(capacity_factor=2.0)
  causal = False

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs,
               context: LayerContext | None = None, noise_std: float = 0.0,
               init_scale: float = 0.1, **kwargs):
    super().__init__(d_model, num_experts, rngs=rngs, context=context, kwargs=kwargs,
                     gate_init_scale=init_scale, noise_std=noise_std)

  def __call__(self, x: Array, *, token_ids: Array | None = None):
    logits = self.add_noise(self.gate(x))
    return experts_choice_capped(logits, capacity=self.slots(x.shape[1]), **self.routing_kwargs)

"""Capped expert choice router module (EC-CAP, Zhou et al. 2022 §3.3); math in
`routing/experts_choice_capped.py`."""
from __future__ import annotations

import jax
from flax import nnx

from moe_jax.layers.routers import LinearGate, Router
from moe_jax.routing.experts_choice_capped import experts_choice_capped

Array = jax.Array


class ExpertsChoiceCappedRouter(Router):
  """Expert choice whose assignment solves the entropy-regularised capped LP first.

  router_kwargs: `capacity_factor` (default 2.0, as EC), `eval_capacity_factor`,
  `max_experts_per_token` b (default 2: EC-CAP2; 3 gives EC-CAP3), `temperature` λ
  (0.003), `start_temperature` (0.3, annealed down to λ), `num_iters` (Dykstra sweeps,
  100), `enforce_cap` (False: the paper's plain top-C rounding; True: drop the picks
  beyond b per token), `noise_std`, `init_scale`, `z_loss_weight`, and the capacity
  convention keywords. No aux loss by default.
  Not causal: each expert ranks every token of the group.
  """
  routing_fn = staticmethod(experts_choice_capped)
  causal = False

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs,
               capacity_factor: float = 2.0, eval_capacity_factor: float | None = None,
               max_experts_per_token: int = 2, temperature: float = 0.003,
               start_temperature: float = 0.3, num_iters: int = 100, enforce_cap: bool = False,
               noise_std: float = 0.0, init_scale: float = 0.1, **routing_kwargs):
    self.gate = LinearGate(d_model, num_experts, init_scale=init_scale, rngs=rngs)
    self.capacity_factor = capacity_factor
    self.eval_capacity_factor = eval_capacity_factor or capacity_factor
    self.routing_kwargs = dict(routing_kwargs, max_experts_per_token=max_experts_per_token,
                               temperature=temperature, start_temperature=start_temperature,
                               num_iters=num_iters, enforce_cap=enforce_cap)
    self._init_noise(noise_std, rngs)

  def __call__(self, x: Array, *, token_ids: Array | None = None):
    logits = self._noisy(self.gate(x))
    cf = self.eval_capacity_factor if self.deterministic else self.capacity_factor
    return experts_choice_capped(logits, capacity_factor=cf, **self.routing_kwargs)

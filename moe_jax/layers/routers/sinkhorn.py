"""`SinkhornBaseRouter`: S-BASE (Clark et al. 2022), registry name 'sinkhorn_base'.

A linear router (Switch init, float32 logits) whose training-time top-1 comes from the
Sinkhorn transport plan of its logits (`routing.sinkhorn`), no gradient through the
plan; greedy top-1 at evaluation. Gate σ(logit) by default (BASE's gate; the paper
text was not available to check, Megatron's S-BASE-style router uses σ for top-1), or
the softmax probability with `gate='softmax'`. No aux loss. Not causal.
"""
from __future__ import annotations

import jax
from flax import nnx

from moe_jax.layers.moe_config import LayerContext
from moe_jax.layers.routers.base import Router
from moe_jax.routing import CapacitySpec, sinkhorn
from moe_jax.routing.types import Routing

Array = jax.Array


class SinkhornBaseRouter(Router):
  """S-BASE router.

  router_kwargs:
    gate: 'sigmoid' (default) or 'softmax'.
    temperature: τ of exp(logits / τ) (default 1.0).
    num_iters: fixed Sinkhorn iteration count, or None (default) for tolerance mode:
      stop when every row sum is within `tol` (default 1e-3) of 1, at most `max_iters`
      (default 100).
    the capacity keywords: none by default = no drops (C = S); capacity_factor gives
      C = ceil(S·cf/E), overflow dropped in token order.
    noise_std, init_scale: as for `TokensChoiceRouter`.
  """
  routing_fn = staticmethod(sinkhorn.sinkhorn_base)
  set_by_router = ('train',)
  default_capacity = CapacitySpec()
  causal = False

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs,
               context: LayerContext | None = None, gate: str = 'sigmoid',
               temperature: float = 1.0, noise_std: float = 0.0, init_scale: float = 0.1,
               **kwargs):
    if gate not in sinkhorn.GATES:
      raise ValueError(f'gate must be one of {sinkhorn.GATES}, got {gate!r}.')
    if temperature <= 0:
      raise ValueError(f'temperature must be > 0, got {temperature}.')
    super().__init__(d_model, num_experts, rngs=rngs, context=context, kwargs=kwargs,
                     gate_init_scale=init_scale, noise_std=noise_std)
    self.gate_kind, self.temperature = gate, temperature

  def __call__(self, x: Array, *, token_ids: Array | None = None) -> Routing:
    logits = self.add_noise(self.gate(x))
    return sinkhorn.sinkhorn_base(logits, train=not self.deterministic, gate=self.gate_kind,
                                  temperature=self.temperature, capacity=self.slots(x.shape[1]),
                                  **self.routing_kwargs)

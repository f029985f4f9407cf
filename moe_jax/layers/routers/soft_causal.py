"""Causal Soft MoE router module (our decoder extension of Soft MoE); math and design in
`routing/soft_causal.py`; registry name 'soft_moe_causal'."""
from __future__ import annotations

import jax
from flax import nnx

from moe_jax.layers.moe_config import LayerContext
from moe_jax.layers.routers.soft import SoftMoeRouter
from moe_jax.routing.soft_causal import soft_moe_causal

Array = jax.Array


class SoftMoeCausalRouter(SoftMoeRouter):
  """Soft MoE whose slots are tied to positions so that y_t depends on x_1..x_t only.

  Same parameters and logits as `SoftMoeRouter` (Φ [d, E, P], learned scale, l2
  normalisation, optional noise). Position t opens `slots_per_position` slot instances,
  cycling over experts; see `routing.soft_moe_causal` for the design and its cost.

  router_kwargs:
    num_slots: P, slot parameter vectors per expert, cycled over an expert's instances
      (default 1).
    slots_per_position: r, slot instances per token (the analogue of Soft MoE's total
      slots / tokens; cost ∝ r; default 1).
    normalize, noise_std: as `SoftMoeRouter`.
  Causal: yes.
  """
  causal = True

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs,
               context: LayerContext | None = None, num_slots: int = 1,
               slots_per_position: int = 1, normalize: bool = True, noise_std: float = 0.0,
               capacity_factor: float | None = None, **kwargs):
    if capacity_factor is not None:
      raise ValueError('soft_moe_causal sizes its slots per position: pass '
                       'slots_per_position (slot instances per token) instead of '
                       'capacity_factor.')
    if slots_per_position < 1:
      raise ValueError(f'slots_per_position must be >= 1, got {slots_per_position}.')
    super().__init__(d_model, num_experts, rngs=rngs, context=context, num_slots=num_slots,
                     normalize=normalize, noise_std=noise_std, **kwargs)
    self.slots_per_position = slots_per_position

  def __call__(self, x: Array, *, token_ids: Array | None = None):
    return soft_moe_causal(self.logits(x), slots_per_position=self.slots_per_position)

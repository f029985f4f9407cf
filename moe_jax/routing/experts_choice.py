"""Expert choice: every expert picks its top-C tokens (Zhou et al. 2022, arXiv 2202.09368).

    S = softmax(logits)   over experts, per token, float32 (paper, vmoe, flaxformer)
    each expert e takes the C tokens with the highest S[:, e]; combine weight = S.

Balanced by construction: no auxiliary loss, nothing dropped. A token may be taken by
0..E experts. Not causal: an expert's top-C looks at every token of the group.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import losses as losses_lib
from moe_jax.routing.capacity import compute_capacity
from moe_jax.routing.metrics import sparse_metrics
from moe_jax.routing.types import Routing

Array = jax.Array


def experts_choice(logits: Array, *, capacity_factor: float | None = 2.0,
                   capacity: int | None = None, z_loss_weight: float = 0.0,
                   capacity_rounding: str = 'ceil', capacity_multiple_of: int = 1,
                   min_capacity: int = 1) -> Routing:
  """Expert-choice routing.

  Args:
    logits: [G, S, E] router logits.
    capacity_factor: c, average experts per token; C = ceil(S · c / E). The paper's
      default c = 2 matches top-2 token-choice compute; the Soft MoE paper compares at c = 1.
    capacity: explicit C (overrides `capacity_factor`).
    z_loss_weight: optional router z-loss coefficient (0: the paper uses no aux loss).
    capacity_rounding, capacity_multiple_of, min_capacity: see `compute_capacity`.

  Returns:
    A sparse `Routing` in which every slot is filled.
  """
  logits = logits.astype(jnp.float32)
  _, s, num_experts = logits.shape
  if capacity is None:
    capacity = compute_capacity(s, num_experts, capacity_factor, rounding=capacity_rounding,
                                multiple_of=capacity_multiple_of, min_capacity=min_capacity)
  if capacity > s:
    raise ValueError(f'capacity {capacity} exceeds the {s} tokens of a group.')
  probs = jax.nn.softmax(logits, axis=-1)
  slot_weight, slot_token = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), capacity)   # [G, E, C]
  z = losses_lib.router_z_loss(logits)
  metrics = sparse_metrics(slot_token, s, probs)
  metrics['router_z_loss'] = z
  return Routing(num_tokens=s, slot_token=slot_token.astype(jnp.int32), slot_weight=slot_weight,
                 aux_losses=losses_lib.weighted(dict(router_z=z), dict(router_z=z_loss_weight)),
                 metrics=metrics)

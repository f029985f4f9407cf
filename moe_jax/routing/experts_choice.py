"""Expert choice: every expert picks its top-C tokens (Zhou et al. 2022, arXiv 2202.09368).

    S = softmax(logits)   over experts, per token, float32 (paper, vmoe, flaxformer)
    each expert e takes the C tokens with the highest S[:, e]; combine weight = S.

Balanced by construction: no auxiliary loss, nothing dropped. A token may be taken by
0..E experts. Not causal: an expert's top-C looks at every token of the group.

`experts_choice_token_eval` is a causal evaluation rule for a model trained with expert
choice (e.g. a decoder trained with `allow_future_leak=True`): every token takes its own
top-k experts by the same probabilities S, with the same combine weights, and capacity
for all (C = S, nothing dropped). Token t's routing then reads token t only, so the gap
between evaluating with the training rule and with this one measures what the training
rule gained from later tokens (the leak the Expert Choice paper's §6 warns about).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import losses as losses_lib
from moe_jax.routing.capacity import compute_capacity
from moe_jax.routing.metrics import router_logit_max, sparse_metrics
from moe_jax.routing.tokens_choice import finish_token_routing
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
  metrics['router_logit_max'] = router_logit_max(logits)
  return Routing(num_tokens=s, slot_token=slot_token.astype(jnp.int32), slot_weight=slot_weight,
                 aux_losses=losses_lib.weighted(dict(router_z=z), dict(router_z=z_loss_weight)),
                 metrics=metrics)


def token_eval_k(capacity_factor: float | None) -> int:
  """The causal rule's experts per token for a capacity factor c: round(c), at least 1
  (c is the average number of experts per token under expert choice)."""
  return max(1, int(round(capacity_factor or 1.0)))


def experts_choice_token_eval(logits: Array, *, k: int) -> Routing:
  """The causal evaluation rule of an expert-choice router: per-token top-k, no drops.

  Args:
    logits: [G, S, E] router logits (the expert-choice router's own).
    k: experts per token (`token_eval_k(capacity_factor)` by default in the router).

  Returns:
    A sparse `Routing` with C = S: token t goes to the k experts with the highest
    S[t, :] = softmax(logits[t]) with combine weights S[t, e] (expert choice's weights);
    every choice gets a slot, so token t's output depends on token t only.
  """
  logits = logits.astype(jnp.float32)
  _, s, num_experts = logits.shape
  if not 1 <= k <= num_experts:
    raise ValueError(f'k={k} must be between 1 and the number of experts ({num_experts}).')
  probs = jax.nn.softmax(logits, axis=-1)
  weight, expert_index = jax.lax.top_k(probs, k)                     # [G, S, k]
  z = losses_lib.router_z_loss(logits)
  # C = S: an expert gets each token at most once (top-k experts are distinct).
  return finish_token_routing(probs, expert_index, weight, capacity=s, slot_order='token',
                              metrics=dict(router_z_loss=z,
                                           router_logit_max=router_logit_max(logits)))

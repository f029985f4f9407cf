"""Token choice: every token picks its top-k experts (Shazeer 2017, GShard, Switch, V-MoE).

    p = softmax(logits)            in float32, over experts
    (w, e) = top_k(p, k)           combine weights are the raw probabilities (Switch,
                                   V-MoE, flaxformer) or renormalised over the k
                                   (GShard) with `renormalize=True`
    slots: all first choices before any second choice; overflow beyond capacity C is
           dropped (zero MoE output for that choice; the residual carries the token).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import losses as losses_lib
from moe_jax.routing.assign import assign_slots
from moe_jax.routing.capacity import compute_capacity
from moe_jax.routing.metrics import router_logit_max, sparse_metrics
from moe_jax.routing.types import Routing

Array = jax.Array


def finish_token_routing(probs: Array, expert_index: Array, weight: Array, *, capacity: int,
                         mask: Array | None = None, priority: Array | None = None,
                         aux_losses: dict | None = None, metrics: dict | None = None,
                         slot_order: str = 'choice') -> Routing:
  """Builds the `Routing` of any token-choice style router from its choices.

  Args:
    probs: [G, S, E] float32 router distribution (for metrics).
    expert_index: [G, S, K] int chosen experts.
    weight: [G, S, K] float32 combine weights.
    capacity: C.
    mask: [G, S, K] bool, choices actually requested (default all).
    priority: [G, S] batch-prioritised routing score, or None.
    aux_losses, metrics: extra entries.
    slot_order: 'choice' or 'token' (causal), see `assign_slots`.
  """
  g, s, k = expert_index.shape
  num_experts = probs.shape[-1]
  slot_token, slot_weight, token_slot = assign_slots(
      expert_index, weight, num_experts, capacity, mask=mask, priority=priority,
      slot_order=slot_order)
  requested = g * s * k if mask is None else jnp.sum(mask)
  m = sparse_metrics(slot_token, s, probs, num_requested=requested)
  m.update(metrics or {})
  if mask is not None:
    weight = jnp.where(mask, weight, 0.0)
    token_slot = jnp.where(mask, token_slot, num_experts * capacity)
  return Routing(num_tokens=s, slot_token=slot_token, slot_weight=slot_weight,
                 token_expert=expert_index.astype(jnp.int32), token_weight=weight,
                 token_slot=token_slot, aux_losses=dict(aux_losses or {}), metrics=m)


def tokens_choice(logits: Array, *, k: int = 1, capacity_factor: float | None = 1.25,
                  capacity: int | None = None, batch_priority: bool = False,
                  renormalize: bool = False, load_balance_weight: float = 1e-2,
                  z_loss_weight: float = 0.0, importance_weight: float = 0.0,
                  balance_count: str = 'top1', capacity_include_k: bool = True,
                  capacity_rounding: str = 'ceil', capacity_multiple_of: int = 1,
                  min_capacity: int = 1,
                  slot_order: str = 'choice') -> Routing:
  """Softmax top-k token-choice routing with capacity.

  Args:
    logits: [G, S, E] router logits (any float dtype; routing runs in float32).
    k: experts per token (1 = Switch, 2 = GShard / V-MoE).
    capacity_factor: C = ceil(k · S · capacity_factor / E) by default (vmoe convention,
      see `capacity.py` for the others).
    capacity: explicit C, overrides `capacity_factor`.
    batch_priority: batch-prioritised routing (V-MoE BPR): tokens with the highest
      top-1 probability take slots first. Not causal: never use it in a decoder.
    renormalize: divide the k combine weights by their sum (GShard); off by default
      (Switch, V-MoE and flaxformer use the raw probabilities).
    load_balance_weight: coefficient of the Switch/GShard loss E·Σ f·P (1e-2 in both papers).
    z_loss_weight: coefficient of the ST-MoE router z-loss (1e-3 in ST-MoE; 0 in Switch).
    importance_weight: coefficient of the importance CV² loss (V-MoE uses 5e-3).
    balance_count: 'top1' (GShard/Switch/mesh-tf) or 'topk' (Megatron) counts for f.
    capacity_include_k, capacity_rounding, capacity_multiple_of, min_capacity: the
      capacity convention (see `compute_capacity`).
    slot_order: 'choice' (all first choices before any second: the Google codebases)
      or 'token' (token by token; routers use it in a causal context), see `assign_slots`.

  Returns:
    A sparse `Routing` with capacity C.
  """
  logits = logits.astype(jnp.float32)
  g, s, num_experts = logits.shape
  if not 1 <= k <= num_experts:
    raise ValueError(f'k={k} must be between 1 and the number of experts ({num_experts}).')
  if capacity is None:
    capacity = compute_capacity(s, num_experts, capacity_factor, k=k, include_k=capacity_include_k,
                                rounding=capacity_rounding, multiple_of=capacity_multiple_of,
                                min_capacity=min_capacity)
  probs = jax.nn.softmax(logits, axis=-1)
  weight, expert_index = jax.lax.top_k(probs, k)                    # [G, S, K]
  # BPR priority is the top-1 router probability (V-MoE §3.1), taken before any
  # renormalisation: with k=1 the renormalised weights are all 1 and carry no order.
  priority = jax.lax.stop_gradient(weight[..., 0]) if batch_priority else None
  if renormalize:
    weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
  raw = dict(load_balancing=losses_lib.load_balancing_loss(probs, expert_index, count=balance_count),
             router_z=losses_lib.router_z_loss(logits),
             importance=losses_lib.importance_loss(probs))
  aux = losses_lib.weighted(raw, dict(load_balancing=load_balance_weight, router_z=z_loss_weight,
                                      importance=importance_weight))
  metrics = {f'{n}_loss': v for n, v in raw.items()}
  metrics['router_logit_max'] = router_logit_max(logits)
  return finish_token_routing(probs, expert_index, weight, capacity=capacity, priority=priority,
                              aux_losses=aux, metrics=metrics, slot_order=slot_order)

"""Switch top-1 routing (Fedus et al. 2021, arXiv 2101.03961) and its straight-through gate.

    p = softmax(logits)           float32 ("selective precision")
    i* = argmax p                 one expert per token
    y = w · E_{i*}(x)             w = p_{i*}, the raw probability (not renormalised): the
                                  only path from the task loss into the router
    capacity C = ceil(S · cf / E), cf 1.25 in training, 2.0 at evaluation (paper §2.2)
    aux loss  α · E · Σ_i f_i · P_i, f from argmax counts before capacity, α = 1e-2

Exploration: the best policy in the paper's appendix on exploration, "input jitter",
multiplies the router input by U(1 − ε, 1 + ε), ε = 1e-2, in training only
(`multiplicative_jitter`; mesh-tf `switch_policy_train='input_jitter'`). Only the router
sees the jittered input; the experts get the clean x.

Straight-through gate (Bengio, Léonard, Courville 2013, arXiv 1308.3432, the ST
estimator with the "backprop as if the unit were its soft version" variant):

    w = p_{i*} + stop_gradient(1 − p_{i*})

The forward weight is exactly 1 (hard one-hot routing: y = E_{i*}(x)); the backward pass
is the gradient of p_{i*} · E_{i*}(x). This is the estimator m = p + sg(onehot − p)
applied to a sparse layer: the full ST gradient Σ_j ∂L/∂m_j ∂p_j/∂z would need E_j(x)
for the experts that were not chosen, which a sparse layer never computes, so only the
selected expert's term is kept.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import losses as losses_lib
from moe_jax.routing.capacity import compute_capacity
from moe_jax.routing.metrics import router_logit_max
from moe_jax.routing.tokens_choice import finish_token_routing
from moe_jax.routing.types import Routing

Array = jax.Array


def multiplicative_jitter(x: Array, key: Array, epsilon: float = 1e-2) -> Array:
  """x · U(1 − ε, 1 + ε), elementwise (mesh-tf `multiplicative_jitter`)."""
  if not epsilon:
    return x
  noise = jax.random.uniform(key, x.shape, jnp.float32, 1.0 - epsilon, 1.0 + epsilon)
  return (x.astype(jnp.float32) * noise).astype(x.dtype)


def switch_top1(logits: Array, *, straight_through: bool = False,
                capacity_factor: float = 1.25, capacity: int | None = None,
                load_balance_weight: float = 1e-2, z_loss_weight: float = 0.0,
                capacity_rounding: str = 'ceil', capacity_multiple_of: int = 1,
                min_capacity: int = 1) -> Routing:
  """Switch routing: every token goes to its argmax expert.

  Args:
    logits: [G, S, E] router logits (routing runs in float32).
    straight_through: gate w = p + sg(1 − p) (forward 1, backward ∂p) instead of p.
    capacity_factor: C = ceil(S · capacity_factor / E) (rounding per `capacity_rounding`).
    capacity: explicit C, overrides `capacity_factor`.
    load_balance_weight: α of the Switch loss (1e-2).
    z_loss_weight: ST-MoE router z-loss coefficient (0 in Switch).
    capacity_rounding, capacity_multiple_of, min_capacity: see `compute_capacity`
      (mesh-tf Switch: rounding='floor', min_capacity=4).

  Returns:
    A sparse `Routing` with K = 1.
  """
  logits = logits.astype(jnp.float32)
  _, s, num_experts = logits.shape
  if capacity is None:
    capacity = compute_capacity(s, num_experts, capacity_factor, k=1, rounding=capacity_rounding,
                                multiple_of=capacity_multiple_of, min_capacity=min_capacity)
  probs = jax.nn.softmax(logits, axis=-1)
  weight, expert_index = jax.lax.top_k(probs, 1)                     # [G, S, 1]
  if straight_through:
    weight = weight + jax.lax.stop_gradient(1.0 - weight)
  raw = dict(load_balancing=losses_lib.load_balancing_loss(probs, expert_index, count='top1'),
             router_z=losses_lib.router_z_loss(logits))
  aux = losses_lib.weighted(raw, dict(load_balancing=load_balance_weight, router_z=z_loss_weight))
  metrics = {f'{n}_loss': v for n, v in raw.items()}
  metrics['router_logit_max'] = router_logit_max(logits)
  return finish_token_routing(probs, expert_index, weight, capacity=capacity, aux_losses=aux,
                              metrics=metrics)

"""REINFORCE routing ("RL-R", Clark et al. 2022; estimator of Bengio et al. 2013 / Williams 1992).

The router is a policy π(e | x) = softmax(logits). In training each token *samples* its
k experts from π (k = 1: a categorical draw; k > 1: k draws without replacement, by the
Gumbel-top-k trick, whose probability is the Plackett-Luce product below); at evaluation
it takes the argmax (top-k). Expert outputs are weighted by π_e (Switch-style, default)
or by 1 (`gate='one'`: the router then learns from the policy gradient alone).

The policy gradient needs the task reward, which is only known after the whole model's
forward pass, so the router cannot add its loss itself. The contract:

  * the routing reports `metrics['reinforce_log_prob']`: [G, S] float32, log π of each
    token's sampled choice (differentiable w.r.t. the router); with one routing group
    per example (MoeLayer default) G = B, otherwise reshape to [B, S_seq];
  * the router module also reports `metrics['reinforce_baseline']`: scalar, its current
    moving-average baseline b (no gradient);
  * the trainer computes rewards r = -stop_gradient(task loss), per token [B, S] or per
    example [B], and adds, for every such layer,
        reinforce_surrogate(log_prob, r, b) = -mean_t (r_t - b) · log π(a_t | x_t),
    whose gradient is the score-function estimate -(r - b) ∇ log π (REINFORCE with a
    baseline);
  * after the step it moves the baseline: b <- β b + (1 - β) mean(r) (`update_baseline`;
    the first update sets b = mean(r)), β = 0.99 by default.

Plackett-Luce log-probability of the ordered sample (a_1..a_k) without replacement:
    log P = Σ_i [ log π_{a_i} - log(1 - Σ_{j<i} π_{a_j}) ].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import losses as losses_lib
from moe_jax.routing.capacity import compute_capacity
from moe_jax.routing.tokens_choice import finish_token_routing
from moe_jax.routing.types import Routing

Array = jax.Array

LOG_PROB_KEY = 'reinforce_log_prob'
BASELINE_KEY = 'reinforce_baseline'
GATES = ('prob', 'one')


def sample_log_prob(log_probs: Array, expert_index: Array) -> Array:
  """Plackett-Luce log-probability of ordered choices without replacement.

  Args:
    log_probs: [..., E] log π.
    expert_index: [..., K] distinct chosen experts, in the order they were drawn.
  Returns:
    [...] log P(a_1, ..., a_K).
  """
  chosen = jnp.take_along_axis(log_probs, expert_index, axis=-1)          # [..., K]
  taken = jnp.cumsum(jnp.exp(chosen), axis=-1) - jnp.exp(chosen)          # Σ_{j<i} π_{a_j}
  return jnp.sum(chosen - jnp.log1p(-jnp.minimum(taken, 1.0 - 1e-6)), axis=-1)


def reinforce_routing(logits: Array, key: Array | None, *, k: int = 1,
                      capacity_factor: float | None = 1.25, capacity: int | None = None,
                      gate: str = 'prob', load_balance_weight: float = 1e-2,
                      entropy_weight: float = 0.0, z_loss_weight: float = 0.0,
                      capacity_include_k: bool = True, capacity_rounding: str = 'ceil',
                      capacity_multiple_of: int = 1, min_capacity: int = 1,
                      slot_order: str = 'choice') -> Routing:
  """Sampled (training) or argmax (evaluation) token-choice routing.

  Args:
    logits: [G, S, E] router logits.
    key: PRNG key to sample with (training), or None for the argmax (evaluation).
    k: experts per token.
    capacity_factor, capacity, capacity_*: capacity as in `tokens_choice`.
    gate: 'prob' weights each expert output by π_e (gradient also flows through the
      task loss, as in Switch); 'one' uses weight 1 (pure policy gradient).
    load_balance_weight: Switch loss E·Σ f·P on π and the sampled first choices.
    entropy_weight: β of the entropy bonus -β·mean H(π) (exploration; 0 by default).
    z_loss_weight: ST-MoE router z-loss coefficient.
    slot_order: 'choice' (all first choices before any second: the Google codebases)
      or 'token' (token by token; routers use it in a causal context), see `assign_slots`.

  Returns:
    A sparse `Routing` whose metrics hold `reinforce_log_prob` [G, S] (differentiable).
  """
  if gate not in GATES:
    raise ValueError(f'gate must be one of {GATES}, got {gate!r}.')
  logits = logits.astype(jnp.float32)
  _, s, num_experts = logits.shape
  if not 1 <= k <= num_experts:
    raise ValueError(f'k={k} must be between 1 and the number of experts ({num_experts}).')
  if capacity is None:
    capacity = compute_capacity(s, num_experts, capacity_factor, k=k, include_k=capacity_include_k,
                                rounding=capacity_rounding, multiple_of=capacity_multiple_of,
                                min_capacity=min_capacity)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  probs = jnp.exp(log_probs)
  scores = jax.lax.stop_gradient(logits)
  if key is not None:
    # Drawn flat and reshaped: same distribution, and rank-1 draws compile several times
    # faster than rank-3 ones under JAX's default partitionable threefry.
    scores = scores + jax.random.gumbel(key, (logits.size,), jnp.float32).reshape(logits.shape)
  _, expert_index = jax.lax.top_k(scores, k)                              # [G, S, K]
  log_prob = sample_log_prob(log_probs, expert_index)                     # [G, S]
  weight = jnp.take_along_axis(probs, expert_index, axis=-1)
  if gate == 'one':
    weight = jnp.ones_like(weight)
  entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
  raw = dict(load_balancing=losses_lib.load_balancing_loss(probs, expert_index),
             router_z=losses_lib.router_z_loss(logits), entropy_bonus=-entropy)
  aux = losses_lib.weighted(raw, dict(load_balancing=load_balance_weight, router_z=z_loss_weight,
                                      entropy_bonus=entropy_weight))
  metrics = {f'{n}_loss': v for n, v in raw.items()}
  metrics[LOG_PROB_KEY] = log_prob
  return finish_token_routing(probs, expert_index, weight, capacity=capacity, aux_losses=aux,
                              metrics=metrics, slot_order=slot_order)


def _broadcast_like(x: Array, ref: Array) -> Array:
  x = jnp.asarray(x, jnp.float32)
  if x.ndim > ref.ndim:
    raise ValueError(f'rewards/baseline of shape {x.shape} have more axes than the '
                     f'log-probabilities {ref.shape}.')
  return x.reshape(x.shape + (1,) * (ref.ndim - x.ndim))


def reinforce_surrogate(log_probs: Array, rewards: Array, baseline: Array | float,
                        mask: Array | None = None) -> Array:
  """Score-function surrogate  -mean_t sg(r_t - b) · log π(a_t | x_t).

  Its gradient is the REINFORCE estimate of -∇ E[r]; add it to the loss you minimise.

  Args:
    log_probs: [B, S] log π of the sampled choices (`metrics['reinforce_log_prob']`).
    rewards: [B, S] per-token or [B] per-example rewards (e.g. -task loss); gradients
      through them are stopped.
    baseline: scalar (or broadcastable) baseline b, stop-gradient.
    mask: [B, S] or [B] weights (e.g. 0 on padding); the mean is over the mask.
  Returns:
    Scalar.
  """
  advantage = jax.lax.stop_gradient(_broadcast_like(rewards, log_probs)
                                    - _broadcast_like(baseline, log_probs))
  terms = advantage * log_probs
  if mask is None:
    return -jnp.mean(terms)
  m = jnp.broadcast_to(_broadcast_like(mask, log_probs), log_probs.shape)
  return -jnp.sum(terms * m) / jnp.maximum(jnp.sum(m), 1.0)


def update_baseline(baseline: Array, count: Array, rewards: Array, *, decay: float = 0.99,
                    mask: Array | None = None) -> tuple[Array, Array]:
  """Exponential moving average of the mean reward.

  b <- mean(r) on the first update (count == 0), then b <- decay·b + (1 - decay)·mean(r).

  Args:
    baseline: scalar b.
    count: scalar int, updates so far.
    rewards: any shape; mask: same shape or broadcastable weights.
  Returns:
    (new baseline, count + 1).
  """
  rewards = jax.lax.stop_gradient(jnp.asarray(rewards, jnp.float32))
  if mask is None:
    mean = jnp.mean(rewards)
  else:
    m = jnp.broadcast_to(_broadcast_like(mask, rewards), rewards.shape)
    mean = jnp.sum(rewards * m) / jnp.maximum(jnp.sum(m), 1.0)
  new = jnp.where(count == 0, mean, decay * baseline + (1.0 - decay) * mean)
  return new.astype(jnp.float32), count + 1

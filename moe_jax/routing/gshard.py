"""GShard top-2 gating (Lepikhin et al. 2020, arXiv 2006.16668, Algorithm 1).

    g = softmax(logits)                       float32, over experts
    (g1, e1), (g2, e2) = top-2 of g
    g1, g2 <- g1 / (g1 + g2), g2 / (g1 + g2)  renormalised gates
    first choice always requested; second choice by `second_policy`:
      'random'    dispatch to e2 iff U(0, 1) < g2 / second_threshold; threshold 0.5 is
                  the paper's "2·g2 > U" (Algorithm 1); mesh-tf uses 0.2 (P = min(1, 5·g2))
      'threshold' dispatch iff g2 > second_threshold (mesh-tf; default threshold 0.2)
      'all'       always (flaxformer / ST-MoE top-2)
      'none'      never (top-1 with GShard's capacity)
    capacity C = 2S/E per group (paper): `capacity_factor=1` with k = 2 included and ceil
    (fairseq uses 2·ceil(S/E), mesh-tf int(S·cf/E): pass `capacity` or the capacity options)
    aux loss  mean_e(c_e/S · m_e) · E²  with c_e the top-1 counts (before capacity) and
              m_e the mean gate (`load_balancing_loss(count='top1')`); coefficient 1e-2
              (mesh-tf loss_coef; the paper's 1/E·Σ is this divided by E², the "const").

Normalisation order (codebases disagree, notes §2b):
  'before' (default; paper Algorithm 1, mesh-tf): g1, g2 normalised over the two choices
           before any drop, so a kept first choice keeps weight g1/(g1+g2) even when the
           second is dropped;
  'after'  (lingvo, fairseq default): renormalised over the choices that survived the
           policy and the capacity (a lone survivor gets weight 1).
The random test always uses the normalised g2, as in the paper (fairseq's default uses the
unnormalised softmax value).

All first choices take slots before any second choice (`assign_slots`); a second choice
dropped by the policy takes no slot. Causal: every decision depends on the token alone,
and slots go in token order.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import losses as losses_lib
from moe_jax.routing.capacity import compute_capacity
from moe_jax.routing.tokens_choice import finish_token_routing
from moe_jax.routing.types import Routing

Array = jax.Array

SECOND_POLICIES = ('random', 'threshold', 'all', 'none')
RENORMALIZE = ('before', 'after')
DEFAULT_SECOND_THRESHOLD = {'random': 0.5, 'threshold': 0.2}


def second_choice_mask(g2: Array, policy: str, threshold: float | None = None,
                       uniform: Array | None = None) -> Array:
  """Whether each token's second choice is dispatched.

  Args:
    g2: [G, S] normalised second gate g2 / (g1 + g2).
    policy: one of SECOND_POLICIES.
    threshold: see the module docstring; None takes DEFAULT_SECOND_THRESHOLD[policy].
    uniform: [G, S] U(0, 1) draws, required by 'random'.
  Returns:
    [G, S] bool.
  """
  if policy not in SECOND_POLICIES:
    raise ValueError(f'second_policy must be one of {SECOND_POLICIES}, got {policy!r}.')
  if threshold is None:
    threshold = DEFAULT_SECOND_THRESHOLD.get(policy, 0.0)
  if policy == 'all':
    return jnp.ones(g2.shape, bool)
  if policy == 'none':
    return jnp.zeros(g2.shape, bool)
  if policy == 'threshold':
    return g2 > threshold
  if uniform is None:
    raise ValueError("second_policy='random' needs `uniform` draws of shape [G, S] "
                     "(the router module samples them in training).")
  if threshold <= 0:
    raise ValueError(f"second_policy='random' needs second_threshold > 0, got {threshold}.")
  return uniform < g2 / threshold


def _renormalize_survivors(r: Routing, gates: Array, mask: Array) -> Routing:
  """'after': weights over the choices kept by the policy (token side, what a dropless
  engine uses) and over those also kept by capacity (slot side)."""
  g, s, k = gates.shape
  num_slots = r.num_experts * r.capacity

  def normalise(keep):
    w = jnp.where(keep, gates, 0.0)
    total = jnp.sum(w, axis=-1, keepdims=True)
    return w / jnp.where(total > 0, total, 1.0)

  token_weight = normalise(mask)
  slot_side = normalise(mask & (r.token_slot < num_slots))
  slot_weight = jax.vmap(
      lambda ts, w: jnp.zeros(num_slots, w.dtype).at[ts].set(w, mode='drop'))(
          r.token_slot.reshape(g, s * k), slot_side.reshape(g, s * k))
  return r.replace(token_weight=token_weight,
                   slot_weight=slot_weight.reshape(g, r.num_experts, r.capacity))


def gshard_top2(logits: Array, *, uniform: Array | None = None, second_policy: str = 'random',
                second_threshold: float | None = None, renormalize: str = 'before',
                capacity_factor: float = 1.0, capacity: int | None = None,
                load_balance_weight: float = 1e-2, z_loss_weight: float = 0.0,
                capacity_include_k: bool = True, capacity_rounding: str = 'ceil',
                capacity_multiple_of: int = 1, min_capacity: int = 1,
                slot_order: str = 'choice') -> Routing:
  """GShard top-2 routing.

  Args:
    logits: [G, S, E] router logits, E >= 2.
    uniform: [G, S] U(0, 1) draws for `second_policy='random'`.
    second_policy: 'random' (paper), 'threshold', 'all' or 'none'.
    second_threshold: 'random': dispatch iff U < g2 / threshold (0.5 = paper's 2·g2 > U);
      'threshold': dispatch iff g2 > threshold (default 0.2, mesh-tf).
    renormalize: 'before' (paper, mesh-tf) or 'after' (lingvo, fairseq) the drops.
    capacity_factor: C = ceil(2 · S · capacity_factor / E); 1.0 is the paper's 2S/E.
    capacity: explicit C, overrides `capacity_factor`.
    load_balance_weight: coefficient of the top-1-count balance loss (1e-2).
    z_loss_weight: optional ST-MoE router z-loss coefficient (0: not in GShard).
    capacity_include_k, capacity_rounding, capacity_multiple_of, min_capacity: capacity
      convention (see `compute_capacity`).
    slot_order: 'choice' (all first choices before any second: the Google codebases)
      or 'token' (token by token; routers use it in a causal context), see `assign_slots`.

  Returns:
    A sparse `Routing` with K = 2 (second choices dropped by the policy are masked).
  """
  logits = logits.astype(jnp.float32)
  _, s, num_experts = logits.shape
  if num_experts < 2:
    raise ValueError(f'gshard_top2 needs at least 2 experts, got {num_experts}.')
  if renormalize not in RENORMALIZE:
    raise ValueError(f'renormalize must be one of {RENORMALIZE}, got {renormalize!r}.')
  if capacity is None:
    capacity = compute_capacity(s, num_experts, capacity_factor, k=2, include_k=capacity_include_k,
                                rounding=capacity_rounding, multiple_of=capacity_multiple_of,
                                min_capacity=min_capacity)
  probs = jax.nn.softmax(logits, axis=-1)
  top, expert_index = jax.lax.top_k(probs, 2)                        # [G, S, 2]
  normalised = top / jnp.sum(top, axis=-1, keepdims=True)
  keep2 = second_choice_mask(jax.lax.stop_gradient(normalised[..., 1]), second_policy,
                             second_threshold, uniform)
  mask = jnp.stack([jnp.ones_like(keep2), keep2], axis=-1)
  raw = dict(load_balancing=losses_lib.load_balancing_loss(probs, expert_index, count='top1'),
             router_z=losses_lib.router_z_loss(logits))
  aux = losses_lib.weighted(raw, dict(load_balancing=load_balance_weight, router_z=z_loss_weight))
  metrics = {f'{n}_loss': v for n, v in raw.items()}
  metrics['second_dispatched_fraction'] = jnp.mean(keep2.astype(jnp.float32))
  r = finish_token_routing(probs, expert_index, normalised if renormalize == 'before' else top,
                           capacity=capacity, mask=mask, aux_losses=aux, metrics=metrics,
                           slot_order=slot_order)
  if renormalize == 'after':
    r = _renormalize_survivors(r, top, mask)
  return r

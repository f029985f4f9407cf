"""Expert choice with a cap on experts per token ("EC-CAP", Zhou et al. 2022 §3.3).

Plain expert choice lets a token be taken by 0..E experts. EC-CAP first solves the
entropy-regularised linear program, per routing group,

    max_A  <S, A> + λ H(A),     H(A) = -Σ A log A,     A: [E, S]
    s.t.   Σ_t A[e, t] = C      for every expert e     (each expert fills its C slots)
           Σ_e A[e, t] <= b     for every token t      (at most b experts per token)
           0 <= A <= 1

with S = softmax(logits) over experts (the EC scores), then lets every expert take the
C tokens with the largest A[e, :]; combine weights are the scores S, as in plain EC.

Solver: the problem equals the KL projection of K = exp(S / λ) onto the intersection of
the three constraint sets, which Dykstra's algorithm with Bregman (KL) projections
solves by cycling through closed-form projections (Benamou et al. 2015, "Iterative
Bregman projections for regularized transportation problems"; the EC paper also uses
Dykstra). The row equalities are affine and need no Dykstra correction; the column
caps and the box carry one correction each. Everything runs in the log domain (no
overflow of exp(S/λ) for small λ), for a fixed number of iterations under jit, on
stop-gradient scores: the router learns through the combine weights only, as in EC.

What is guaranteed after rounding (the top-C per expert):
  * every expert gets exactly C distinct tokens (as in EC);
  * the plan A meets the cap up to the solver tolerance, but rounding a fractional A
    can still give a token more than b experts. For generic scores the LP optimum is
    integral (the constraint matrix is that of a bipartite b-matching), so as λ -> 0 and
    the iterations converge the top-C sets are exactly the LP solution and meet the cap;
    `cap_violation_fraction` reports how often rounding broke it.
  * `enforce_cap=True` makes the cap exact: a token picked by more than b experts keeps
    only its b largest A[e, t]; the other slots stay empty (those experts process
    fewer than C tokens). Not in the paper; off by default.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import losses as losses_lib
from moe_jax.routing.capacity import compute_capacity
from moe_jax.routing.metrics import sparse_metrics
from moe_jax.routing.types import Routing

Array = jax.Array


def capped_plan(scores: Array, *, capacity: int, max_experts_per_token: float,
                temperature: float = 0.01, num_iters: int = 50) -> Array:
  """Approximate solution A of the entropy-regularised EC-CAP program (see module doc).

  Args:
    scores: [G, S, E] token-expert scores (EC: softmax over experts).
    capacity: C, tokens per expert (row sum of A).
    max_experts_per_token: b, cap on each token's column sum.
    temperature: λ > 0, the entropy weight; smaller is closer to the LP, slower.
    num_iters: Dykstra sweeps (each applies the three projections once).

  Returns:
    A: [G, E, S] float32, 0 <= A <= 1, row sums C, column sums <= b (to tolerance).
  """
  if temperature <= 0:
    raise ValueError(f'temperature must be > 0, got {temperature}.')
  _, s, e = scores.shape
  if capacity > s:
    raise ValueError(f'capacity {capacity} exceeds the {s} tokens of a group.')
  if e * capacity > s * max_experts_per_token + 1e-9:
    raise ValueError(
        f'EC-CAP is infeasible: {e} experts x capacity {capacity} = {e * capacity} slots but '
        f'{s} tokens x max_experts_per_token {max_experts_per_token} = '
        f'{s * max_experts_per_token}; lower capacity_factor or raise max_experts_per_token.')
  log_c = jnp.log(jnp.float32(capacity))
  log_b = jnp.log(jnp.float32(max_experts_per_token))
  log_a = jnp.swapaxes(scores.astype(jnp.float32), 1, 2) / temperature     # [G, E, S]

  def sweep(_, carry):
    log_a, corr_cap, corr_box = carry
    # Rows: scale each expert's mass to C (affine: no correction).
    log_a = log_a - (jax.nn.logsumexp(log_a, axis=2, keepdims=True) - log_c)
    # Columns: scale down tokens whose mass exceeds b.
    y = log_a + corr_cap
    log_a = y - jnp.maximum(jax.nn.logsumexp(y, axis=1, keepdims=True) - log_b, 0.0)
    corr_cap = y - log_a
    # Box: clip at 1.
    y = log_a + corr_box
    log_a = jnp.minimum(y, 0.0)
    corr_box = y - log_a
    return log_a, corr_cap, corr_box

  zeros = jnp.zeros_like(log_a)
  log_a, _, _ = jax.lax.fori_loop(0, num_iters, sweep, (log_a, zeros, zeros))
  return jnp.exp(log_a)


def experts_choice_capped(logits: Array, *, capacity_factor: float | None = 2.0,
                          capacity: int | None = None, max_experts_per_token: int = 2,
                          temperature: float = 0.01, num_iters: int = 50,
                          enforce_cap: bool = False, z_loss_weight: float = 0.0,
                          capacity_rounding: str = 'ceil', capacity_multiple_of: int = 1,
                          min_capacity: int = 1) -> Routing:
  """Capped expert choice (EC-CAP).

  Args:
    logits: [G, S, E] router logits.
    capacity_factor: c, average experts per token; C = ceil(S · c / E) (EC default 2).
    capacity: explicit C (overrides `capacity_factor`).
    max_experts_per_token: b (EC-CAP2: 2, EC-CAP3: 3); E · C <= S · b is required.
    temperature: λ of the entropy term; scores are probabilities in [0, 1].
    num_iters: Dykstra sweeps.
    enforce_cap: drop the assignments that rounding added beyond b per token.
    z_loss_weight: optional router z-loss coefficient (0 in the paper).
    capacity_rounding, capacity_multiple_of, min_capacity: see `compute_capacity`.

  Returns:
    A sparse `Routing`; metrics add `cap_violation_fraction` (tokens with more than b
    experts after rounding) and `max_experts_per_token`.
  """
  logits = logits.astype(jnp.float32)
  g, s, num_experts = logits.shape
  if capacity is None:
    capacity = compute_capacity(s, num_experts, capacity_factor, rounding=capacity_rounding,
                                multiple_of=capacity_multiple_of, min_capacity=min_capacity)
  probs = jax.nn.softmax(logits, axis=-1)
  plan = capped_plan(jax.lax.stop_gradient(probs), capacity=capacity,
                     max_experts_per_token=max_experts_per_token, temperature=temperature,
                     num_iters=num_iters)                                  # [G, E, S]
  _, slot_token = jax.lax.top_k(plan, capacity)                            # [G, E, C]
  slot_token = slot_token.astype(jnp.int32)
  picked = jnp.zeros((g, num_experts, s), bool).at[
      jnp.arange(g)[:, None, None], jnp.arange(num_experts)[None, :, None], slot_token].set(True)
  count = jnp.sum(picked, axis=1)                                         # [G, S]
  violation = jnp.mean((count > max_experts_per_token).astype(jnp.float32))
  if enforce_cap:
    # Rank of each (expert, token) pick among the token's picks, by plan value.
    masked = jnp.where(picked, plan, -1.0)
    rank = jnp.argsort(jnp.argsort(-masked, axis=1), axis=1)               # [G, E, S]
    keep = picked & (rank < max_experts_per_token)
    keep_slot = jnp.take_along_axis(keep, slot_token, axis=2)             # [G, E, C]
    slot_token = jnp.where(keep_slot, slot_token, s)
    count = jnp.sum(keep, axis=1)
  weight_table = jnp.swapaxes(probs, 1, 2)                                 # [G, E, S]
  slot_weight = jnp.take_along_axis(weight_table, jnp.minimum(slot_token, s - 1), axis=2)
  slot_weight = jnp.where(slot_token < s, slot_weight, 0.0)
  z = losses_lib.router_z_loss(logits)
  metrics = sparse_metrics(slot_token, s, probs,
                           num_requested=g * num_experts * capacity if enforce_cap else None)
  metrics.update(router_z_loss=z, cap_violation_fraction=violation,
                 max_experts_per_token=jnp.max(count).astype(jnp.float32),
                 plan_row_error=jnp.max(jnp.abs(jnp.sum(plan, axis=2) - capacity)),
                 plan_cap_excess=jnp.maximum(jnp.max(jnp.sum(plan, axis=1)) - max_experts_per_token,
                                             0.0))
  return Routing(num_tokens=s, slot_token=slot_token, slot_weight=slot_weight,
                 aux_losses=losses_lib.weighted(dict(router_z=z), dict(router_z=z_loss_weight)),
                 metrics=metrics)

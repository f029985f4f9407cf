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
the constraint sets, which Dykstra's algorithm with Bregman (KL) projections solves by
cycling through closed-form projections (Benamou et al. 2015, "Iterative Bregman
projections for regularized transportation problems"; the EC paper also uses Dykstra).
We project alternately on {rows = C, A <= 1} and {columns <= b, A <= 1} (a sort each),
anneal λ from `start_temperature` (ε-scaling), and work in the log domain (no overflow of
exp(S/λ)), for a fixed number of sweeps under jit, on stop-gradient scores: the router
learns through the combine weights only, as in EC.

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


def _capped_simplex_log(log_y: Array, total, axis: int) -> Array:
  """KL projection of y onto {x : Σ x = total, 0 <= x <= 1} along `axis`, in log space.

  The solution is x = min(c·y, 1) with c set so the sum is `total` ("water filling"):
  with the j largest entries clipped to 1, c_j = (total - j) / Σ_{i>=j} y_(i); take the
  smallest j whose first unclipped entry satisfies c_j·y_(j) <= 1.
  """
  ly = jnp.moveaxis(log_y, axis, -1)
  n = ly.shape[-1]
  ordered = -jnp.sort(-ly, axis=-1)
  tail = jax.lax.cumlogsumexp(ordered, axis=ly.ndim - 1, reverse=True)     # log Σ_{i>=j} y_(i)
  clipped = jnp.arange(n, dtype=jnp.float32)
  log_c = jnp.log(jnp.maximum(total - clipped, 1e-30)) - tail
  ok = (log_c + ordered <= 0.0) & (clipped < total)
  log_c = jnp.take_along_axis(log_c, jnp.argmax(ok, axis=-1)[..., None], axis=-1)
  return jnp.moveaxis(jnp.minimum(ly + log_c, 0.0), -1, axis)


def capped_plan(scores: Array, *, capacity: int, max_experts_per_token: float,
                temperature: float = 0.003, start_temperature: float = 0.3,
                num_iters: int = 100) -> Array:
  """Approximate solution A of the entropy-regularised EC-CAP program (see module doc).

  Two constraint sets, each with a closed-form KL projection: the rows
  {Σ_t A[e, t] = C, 0 <= A <= 1} and the columns {Σ_e A[e, t] <= b, 0 <= A <= 1}
  (keeping the box in both converges much faster than a third, separate box set).
  Dykstra keeps one correction per set. The temperature falls geometrically from
  `start_temperature` to `temperature` over the first half of the sweeps, with the
  state kept in score units (ε-scaling, as for Sinkhorn), then stays at `temperature`.

  Args:
    scores: [G, S, E] token-expert scores (EC: softmax over experts, so in [0, 1]).
    capacity: C, tokens per expert (row sum of A).
    max_experts_per_token: b, cap on each token's column sum.
    temperature: λ > 0, the entropy weight of the program solved.
    start_temperature: first λ of the annealing (<= λ: no annealing).
    num_iters: Dykstra sweeps (each projects on both sets once).

  Returns:
    A: [G, E, S] float32, 0 <= A <= 1, row sums C (to tolerance), column sums <= b.
  """
  if temperature <= 0:
    raise ValueError(f'temperature must be > 0, got {temperature}.')
  if num_iters < 1:
    raise ValueError(f'num_iters must be >= 1, got {num_iters}.')
  _, s, e = scores.shape
  if capacity > s:
    raise ValueError(f'capacity {capacity} exceeds the {s} tokens of a group.')
  if e * capacity > s * min(max_experts_per_token, e) + 1e-9:
    raise ValueError(
        f'EC-CAP is infeasible: {e} experts x capacity {capacity} = {e * capacity} slots but '
        f'{s} tokens x max_experts_per_token {max_experts_per_token} = '
        f'{s * max_experts_per_token}; lower capacity_factor or raise max_experts_per_token.')
  n_anneal = num_iters // 2 if start_temperature > temperature else 0
  temps = jnp.concatenate([jnp.geomspace(start_temperature, temperature, n_anneal),
                           jnp.full(num_iters - n_anneal, temperature)]).astype(jnp.float32)
  return _dykstra(scores.astype(jnp.float32), jnp.float32(capacity),
                  jnp.float32(max_experts_per_token), temps)


@jax.jit
def _dykstra(scores: Array, capacity: Array, cap: Array, temps: Array) -> Array:
  """The sweeps of `capped_plan`; numbers are traced so one compilation serves all settings.

  scores: [G, S, E]; capacity, cap: scalars; temps: [num_iters] λ of each sweep.
  """

  def sweep(i, carry):
    # u = λ·log A and the corrections are in score units, so they survive a change of λ.
    u, corr_rows, corr_cols = carry
    lam = temps[i]
    y = (u + corr_rows) / lam
    log_a = _capped_simplex_log(y, capacity, axis=2)
    corr_rows = u + corr_rows - lam * log_a
    u_mid = lam * log_a
    y = (u_mid + corr_cols) / lam
    boxed = jnp.minimum(y, 0.0)
    over = jax.nn.logsumexp(boxed, axis=1, keepdims=True) > jnp.log(cap)
    log_a = jnp.where(over, _capped_simplex_log(y, cap, axis=1), boxed)
    corr_cols = u_mid + corr_cols - lam * log_a
    return lam * log_a, corr_rows, corr_cols

  u = jnp.swapaxes(scores, 1, 2)                                          # [G, E, S]
  zeros = jnp.zeros_like(u)
  u, _, _ = jax.lax.fori_loop(0, temps.shape[0], sweep, (u, zeros, zeros))
  return jnp.exp(u / temps[-1])


def experts_choice_capped(logits: Array, *, capacity_factor: float | None = 2.0,
                          capacity: int | None = None, max_experts_per_token: int = 2,
                          temperature: float = 0.003, start_temperature: float = 0.3,
                          num_iters: int = 100,
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
    start_temperature: first λ of the annealing.
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
                     start_temperature=start_temperature, num_iters=num_iters)   # [G, E, S]
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

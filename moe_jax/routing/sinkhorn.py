"""Sinkhorn-BASE, "S-BASE" (Clark et al. 2022, "Unified Scaling Laws for Routed Language
Models", arXiv 2202.01169): BASE with the exact assignment replaced by entropic optimal
transport, computed with Sinkhorn iterations on the router logits.

    P = diag(u) · exp(logits / τ) · diag(v)     rows sum to 1, columns to S / E
    training:   expert(t) = argmax_e P[t, e]    (no gradient through P)
    evaluation: expert(t) = argmax_e logits[t, e]   (greedy, no balancing)
    combine weight = σ(logits[t, e]) ('sigmoid', default) or softmax(logits)[t, e]

The argmax of each row of P is only approximately balanced (exact balance needs the
τ -> 0 limit, i.e. BASE), so a capacity can be set; by default nothing is dropped.
Iterations run in the log domain (no overflow at small τ).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing.capacity import compute_capacity
from moe_jax.routing.tokens_choice import finish_token_routing
from moe_jax.routing.types import Routing

Array = jax.Array

GATES = ('sigmoid', 'softmax')


def sinkhorn_potentials(logits: Array, *, temperature: float = 1.0, num_iters: int | None = None,
                        tol: float = 1e-3, max_iters: int = 100) -> tuple[Array, Array, dict]:
  """Log-domain Sinkhorn for marginals rows = 1, columns = S/E, per group.

  Each iteration sets  f = -logsumexp_e(L + g)  (rows exact), then
  g = log(S/E) - logsumexp_t(L + f)  (columns exact), with L = logits / τ and g = 0 at
  the start, so `num_iters=n` equals n numpy steps u = 1/(K v), v = (S/E)/(Kᵀ u).

  Args:
    logits: [G, S, E].
    temperature: τ; smaller is closer to the hard balanced assignment.
    num_iters: fixed count (static; `fori_loop`), or None for tolerance mode.
    tol: tolerance mode stops once every row sum is within `tol` of 1 (columns are
      exact after each iteration), or after `max_iters`.

  Returns:
    f [G, S], g [G, E] with P = exp(L + f[..., None] + g[:, None, :]), and metrics
    (`sinkhorn_iters`, `sinkhorn_row_error` = max |row sum - 1| of the returned plan).
  """
  lg = jax.lax.stop_gradient(logits).astype(jnp.float32) / temperature
  _, s, e = lg.shape
  log_col = jnp.log(s / e)

  def rows(g):
    return -jax.nn.logsumexp(lg + g[:, None, :], axis=2)                # [G, S]

  def cols(f):
    return log_col - jax.nn.logsumexp(lg + f[:, :, None], axis=1)        # [G, E]

  def step(carry):
    f, g, n, _ = carry
    f = rows(g)
    g = cols(f)
    err = jnp.max(jnp.abs(jnp.exp(f - rows(g)) - 1.0))   # row sums of the new plan, minus 1
    return f, g, n + 1, err

  f0 = jnp.zeros(lg.shape[:2], jnp.float32)
  init = (f0, jnp.zeros((lg.shape[0], e), jnp.float32), jnp.int32(0), jnp.float32(jnp.inf))
  if num_iters is not None:
    f, g, n, err = jax.lax.fori_loop(0, num_iters, lambda _, c: step(c), init)
  else:
    f, g, n, err = jax.lax.while_loop(lambda c: (c[3] > tol) & (c[2] < max_iters), step, init)
  return f, g, dict(sinkhorn_iters=n.astype(jnp.float32), sinkhorn_row_error=err)


def sinkhorn_base(logits: Array, *, train: bool = True, gate: str = 'sigmoid',
                  capacity_factor: float | None = None, capacity: int | None = None,
                  temperature: float = 1.0, num_iters: int | None = None, tol: float = 1e-3,
                  max_iters: int = 100) -> Routing:
  """S-BASE top-1 routing.

  Args:
    logits: [G, S, E] router logits.
    train: Sinkhorn top-1 (True) or greedy top-1 (evaluation).
    gate: 'sigmoid' (σ of the chosen logit, BASE's gate; Megatron's choice for top-1)
      or 'softmax' (softmax probability of the chosen expert).
    capacity_factor: None = no drops (C = S); else C = ceil(S · capacity_factor / E),
      overflow dropped in token order.
    capacity: explicit C (overrides `capacity_factor`).
    temperature, num_iters, tol, max_iters: see `sinkhorn_potentials`.

  Returns:
    A sparse `Routing`, no aux loss; metrics add the Sinkhorn iteration count and error.
  """
  if gate not in GATES:
    raise ValueError(f'gate must be one of {GATES}, got {gate!r}.')
  logits = logits.astype(jnp.float32)
  _, s, e = logits.shape
  metrics = {}
  if train:
    # Row scaling f does not change a row's argmax: only the column potentials matter.
    _, g, metrics = sinkhorn_potentials(logits, temperature=temperature, num_iters=num_iters,
                                        tol=tol, max_iters=max_iters)
    lg = jax.lax.stop_gradient(logits) / temperature
    expert = jnp.argmax(lg + g[:, None, :], axis=-1)
  else:
    expert = jnp.argmax(logits, axis=-1)
  expert = expert.astype(jnp.int32)[..., None]                          # [G, S, 1]
  probs = jax.nn.softmax(logits, axis=-1)
  scores = jax.nn.sigmoid(logits) if gate == 'sigmoid' else probs
  weight = jnp.take_along_axis(scores, expert, axis=-1)
  if capacity is None:
    capacity = s if capacity_factor is None else compute_capacity(s, e, capacity_factor)
  return finish_token_routing(probs, expert, weight, capacity=capacity, metrics=metrics)

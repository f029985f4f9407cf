"""EC-CAP: the Dykstra plan against scipy (SLSQP for the entropic program, linprog for the
LP), and the per-token cap after rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog, minimize

from moe_jax.routing import experts_choice
from moe_jax.routing.experts_choice_capped import capped_plan, experts_choice_capped

# Shapes are shared across tests so that each jitted function compiles once: the plan
# tests use [1, 8, 4] (`capped_plan` jits its sweeps with every number traced), the
# routing tests [4, 16, 4].
route = jax.jit(experts_choice_capped, static_argnames=('capacity_factor', 'max_experts_per_token',
                                                        'enforce_cap'))


def softmax(x):
  x = np.exp(x - x.max(-1, keepdims=True))
  return x / x.sum(-1, keepdims=True)


def constraints(num_tokens, num_experts):
  """A[e, t] flattened e-major: row sums (per expert) and column sums (per token)."""
  rows = np.zeros((num_experts, num_experts * num_tokens))
  cols = np.zeros((num_tokens, num_experts * num_tokens))
  for e in range(num_experts):
    rows[e, e * num_tokens:(e + 1) * num_tokens] = 1
  for t in range(num_tokens):
    cols[t, t::num_tokens] = 1
  return rows, cols


def lp_solution(scores, capacity, cap):
  """max <S, A> s.t. rows = C, cols <= b, 0 <= A <= 1 (scipy HiGHS). scores: [S, E]."""
  s, e = scores.shape
  rows, cols = constraints(s, e)
  res = linprog(-scores.T.reshape(-1), A_ub=cols, b_ub=np.full(s, cap), A_eq=rows,
                b_eq=np.full(e, capacity), bounds=(0, 1), method='highs')
  assert res.success
  return res.x.reshape(e, s), -res.fun


def entropic_solution(scores, capacity, cap, lam):
  """max <S, A> + λ H(A) under the same constraints (scipy SLSQP)."""
  s, e = scores.shape
  rows, cols = constraints(s, e)
  c = scores.T.reshape(-1)
  fun = lambda a: -(c @ a - lam * np.sum(a * np.log(a)))
  jac = lambda a: -(c - lam * (np.log(a) + 1))
  cons = [dict(type='eq', fun=lambda a: rows @ a - capacity, jac=lambda a: rows),
          dict(type='ineq', fun=lambda a: cap - cols @ a, jac=lambda a: -cols)]
  res = minimize(fun, np.full(e * s, capacity / s), jac=jac, bounds=[(1e-12, 1)] * (e * s),
                 constraints=cons, method='SLSQP', options=dict(maxiter=500, ftol=1e-12))
  assert res.success
  return res.x.reshape(e, s)


def plan(scores, **kw):
  return np.array(capped_plan(jnp.array(scores[None], jnp.float32), num_iters=300, **kw)[0],
                  np.float64)


@pytest.mark.parametrize('cap', [2, 3])
def test_plan_is_the_entropic_optimum(cap):
  scores = softmax(np.random.default_rng(cap).normal(size=(8, 4)) * 2)
  a = plan(scores, capacity=4, max_experts_per_token=cap, temperature=0.1)
  np.testing.assert_allclose(a, entropic_solution(scores, 4, cap, 0.1), atol=2e-4)


def test_plan_approaches_the_lp_optimum_as_temperature_shrinks():
  """<S, A_λ> + λ H(A_λ) >= OPT (A_LP is integral, H = 0), so OPT - λ H <= <S, A_λ> <= OPT."""
  capacity, cap = 3, 2
  scores = softmax(np.random.default_rng(0).normal(size=(8, 4)) * 2)
  a_lp, opt = lp_solution(scores, capacity, cap)
  assert np.allclose(a_lp, np.round(a_lp), atol=1e-6)           # integral vertex
  gaps = []
  for lam in (0.1, 0.01):
    a = plan(scores, capacity=capacity, max_experts_per_token=cap, temperature=lam)
    np.testing.assert_allclose(a.sum(1), capacity, atol=1e-3)
    assert a.sum(0).max() <= cap + 1e-3 and a.min() >= 0 and a.max() <= 1
    value, ent = np.sum(scores.T * a), -np.sum(a * np.log(np.maximum(a, 1e-30)))
    assert opt - lam * ent - 1e-3 <= value <= opt + 1e-3
    gaps.append(opt - value)
  assert gaps[1] < 0.2 * gaps[0]


def test_recovers_the_lp_assignment_and_meets_the_cap():
  """Planted instances with a unique LP optimum: 16 tokens, 4 experts, C = 8, b = 2 (tight)."""
  g, s, e, cap = 4, 16, 4, 2
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(g, s, e)) * 0.3
  for t in range(s):
    logits[:, t, [t % e, (t + 1) % e]] += 4.0
  r = route(jnp.array(logits, jnp.float32), capacity_factor=2.0, max_experts_per_token=cap)
  for i in range(g):
    a_lp, _ = lp_solution(softmax(logits[i]), 8, cap)
    picked = np.zeros((e, s))
    np.put_along_axis(picked, np.array(r.slot_token[i]), 1.0, axis=1)
    np.testing.assert_array_equal(picked, np.round(a_lp))
    assert picked.sum(0).max() == cap
  assert float(r.metrics['cap_violation_fraction']) == 0.0
  # Combine weights are the softmax scores of the chosen (token, expert) pairs.
  probs = softmax(logits)
  np.testing.assert_allclose(
      r.slot_weight, np.take_along_axis(np.swapaxes(probs, 1, 2), np.array(r.slot_token), 2),
      rtol=1e-5)


def _experts_per_token(slot_token, num_tokens):
  counts = np.zeros((slot_token.shape[0], num_tokens + 1), int)
  for g in range(slot_token.shape[0]):
    np.add.at(counts[g], slot_token[g].reshape(-1), 1)
  return counts[:, :num_tokens]


def test_cap_after_rounding_plain_and_enforced():
  g, s, e, cap = 4, 16, 4, 2
  logits = jnp.array(np.random.default_rng(2).normal(size=(g, s, e)) * 2, jnp.float32)

  @jax.jit
  def routings(logits):
    plain = experts_choice(logits, capacity_factor=2.0)
    capped = experts_choice_capped(logits, capacity_factor=2.0, max_experts_per_token=cap)
    # A rough plan (few sweeps) whose rounding breaks the cap, without and with enforce_cap.
    rough = [experts_choice_capped(logits, capacity_factor=2.0, max_experts_per_token=cap,
                                   num_iters=2, enforce_cap=enforce) for enforce in (False, True)]
    return plain.slot_token, capped, rough

  plain_ec, capped, (rough, enforced) = routings(logits)
  plain_ec = _experts_per_token(np.array(plain_ec), s)
  n_capped = _experts_per_token(np.array(capped.slot_token), s)
  n_rough = _experts_per_token(np.array(rough.slot_token), s)
  n_enforced = _experts_per_token(np.array(enforced.slot_token), s)
  # Without enforce_cap every expert fills its C = 8 slots with distinct tokens.
  for r in (capped, rough):
    assert (np.array(r.slot_token) < s).all()
    assert all(len(set(row)) == 8 for row in np.array(r.slot_token).reshape(-1, 8))
  # The reported violations match a recount; the LP cap makes them rarer than in EC.
  for r, n in ((capped, n_capped), (rough, n_rough)):
    assert float(r.metrics['cap_violation_fraction']) == pytest.approx((n > cap).mean())
  assert (n_capped > cap).mean() < (plain_ec > cap).mean()
  assert (n_rough > cap).mean() > 0
  # What enforce_cap guarantees: never more than b, and it only removes the excess picks.
  assert n_enforced.max() <= cap
  np.testing.assert_array_equal(n_enforced, np.minimum(n_rough, cap))
  assert float(enforced.metrics['dropped_fraction']) == pytest.approx(
      1 - n_enforced.sum() / (g * e * 8), abs=1e-6)


def test_infeasible_cap_is_a_clear_error():
  with pytest.raises(ValueError, match='infeasible'):
    experts_choice_capped(jnp.zeros((1, 10, 3)), capacity_factor=2.0, max_experts_per_token=2)

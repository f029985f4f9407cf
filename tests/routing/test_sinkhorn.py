"""Sinkhorn-BASE (Clark et al. 2022): the transport plan vs numpy, balance, the routing."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from moe_jax.routing import sinkhorn


def np_sinkhorn(logits, temperature, iters):
  """Textbook Sinkhorn-Knopp in float64: rows sum to 1, columns to S/E."""
  k = np.exp(logits.astype(np.float64) / temperature)
  s, e = k.shape
  v = np.ones(e)
  for _ in range(iters):
    u = 1.0 / (k @ v)
    v = (s / e) / (k.T @ u)
  return u[:, None] * k * v[None, :]


def skewed_logits(g=3, s=32, e=4, seed=0):
  a = np.random.default_rng(seed).normal(size=(g, s, e)).astype(np.float32)
  return a + np.array([3.0, 1.5] + [0.0] * (e - 2), np.float32)


def test_plan_matches_numpy_reference_fixed_iterations():
  logits = skewed_logits()
  f, g, _ = jax.jit(lambda l: sinkhorn.sinkhorn_potentials(l, temperature=0.5, num_iters=7))(
      jnp.asarray(logits))
  # P = exp(L/τ + f + g), as the potentials' docstring states.
  plan = np.exp(logits.astype(np.float64) / 0.5 + np.asarray(f)[..., None]
                + np.asarray(g)[:, None, :])
  for i in range(3):
    np.testing.assert_allclose(np.asarray(plan[i]), np_sinkhorn(logits[i], 0.5, 7), rtol=2e-4, atol=1e-7)


def test_tolerance_mode_marginals():
  logits = jnp.asarray(skewed_logits())
  f, g, m = jax.jit(lambda l: sinkhorn.sinkhorn_potentials(l, tol=1e-4))(logits)
  plan = np.exp(np.asarray(logits, np.float64) + np.asarray(f)[..., None] + np.asarray(g)[:, None, :])
  np.testing.assert_allclose(plan.sum(2), 1.0, atol=1.1e-4)              # rows: within tol
  np.testing.assert_allclose(plan.sum(1), 32 / 4, rtol=1e-5)              # columns: exact
  assert 1 < float(m['sinkhorn_iters']) < 100 and float(m['sinkhorn_row_error']) <= 1e-4


def test_sinkhorn_top1_balances_better_than_greedy():
  logits = skewed_logits(g=4, s=64, e=8, seed=1)
  both = jax.jit(lambda l: (sinkhorn.sinkhorn_base(l),
                            sinkhorn.sinkhorn_base(l, temperature=0.1, max_iters=300)))
  r, cold = both(jnp.asarray(logits))
  greedy = np.argmax(logits, -1)
  for i in range(4):
    sk = np.bincount(np.asarray(r.token_expert[i, :, 0]), minlength=8)
    gr = np.bincount(greedy[i], minlength=8)
    assert gr.max() >= 40                 # greedy sends most of the 64 tokens to expert 0
    assert sk.max() <= 12 and sk.min() >= 4, sk     # S/E = 8

  # Lower temperature -> closer to the exact balance of BASE (never exact: rows of the
  # plan are fractional and we take their argmax).
  def deviation(r):
    return sum(np.abs(np.bincount(np.asarray(r.token_expert[i, :, 0]), minlength=8) - 8).sum()
               for i in range(4))
  assert deviation(cold) < 0.75 * deviation(r)


def test_sinkhorn_base_gates_gradient_and_eval():
  logits = jnp.asarray(skewed_logits(g=2, s=16, e=4, seed=2))
  gates = ('sigmoid', 'softmax')

  def gate_sum(l, gate):
    r = sinkhorn.sinkhorn_base(l, train=True, gate=gate, num_iters=20)
    return jnp.sum(r.slot_weight), r

  @jax.jit
  def fn(l):   # one compile for both gates, train (with gradients) and evaluation
    train = [jax.value_and_grad(gate_sum, has_aux=True)(l, g) for g in gates]
    return train, sinkhorn.sinkhorn_base(l, train=False)

  train, r_eval = fn(logits)
  l = np.asarray(logits, np.float64)
  ref_plan = np.stack([np_sinkhorn(l[i], 1.0, 20) for i in range(2)])
  for gate, ((_, r), grad) in zip(gates, train):
    expert = np.asarray(r.token_expert[..., 0])
    np.testing.assert_array_equal(expert, np.argmax(ref_plan, -1))
    if gate == 'sigmoid':
      score = 1 / (1 + np.exp(-l))
    else:
      score = np.exp(l) / np.exp(l).sum(-1, keepdims=True)
    sel = np.take_along_axis(score, expert[..., None], -1)
    np.testing.assert_allclose(np.asarray(r.token_weight[..., 0]), sel[..., 0], rtol=1e-5)
    # No gradient through the plan: d(sum of gates)/d logits is the gate's own derivative.
    if gate == 'sigmoid':
      want = np.zeros_like(l)
      np.put_along_axis(want, expert[..., None], sel * (1 - sel), -1)
    else:
      want = sel * (np.eye(4)[expert] - score)
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-6)
    assert r.aux_losses == {} and abs(float(r.metrics['dropped_fraction'])) < 1e-6 and r.capacity == 16
  np.testing.assert_array_equal(np.asarray(r_eval.token_expert[..., 0]), np.argmax(l, -1))


def test_capacity_factor_drops_in_token_order():
  logits = jnp.asarray(skewed_logits(g=1, s=16, e=4))
  r = jax.jit(lambda l: sinkhorn.sinkhorn_base(l, train=False, capacity_factor=1.0))(logits)
  assert r.capacity == 4
  greedy = np.argmax(np.asarray(logits[0]), -1)
  kept0 = np.asarray(r.slot_token[0, 0])
  np.testing.assert_array_equal(kept0, np.flatnonzero(greedy == 0)[:4])
  with pytest.raises(ValueError, match='gate must be one of'):
    sinkhorn.sinkhorn_base(logits, gate='relu')

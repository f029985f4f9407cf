"""BASE layers (Lewis et al. 2021): balanced assignment vs scipy, gate, evaluation."""
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import jax
import jax.numpy as jnp
from moe_jax.routing import base_layers

assign = jax.jit(base_layers.balanced_assignment)


def scipy_optimum(a):
  """Optimal total of the balanced problem: each expert column repeated S/E times."""
  s, e = a.shape
  rep = np.repeat(a.astype(np.float64), s // e, axis=1)
  rows, cols = linear_sum_assignment(rep, maximize=True)
  return rep[rows, cols].sum()


@pytest.mark.parametrize('shape,skew', [((4, 24, 4), 2.0), ((3, 16, 8), 0.0)])
def test_balanced_assignment_matches_scipy(shape, skew):
  g, s, e = shape
  a = np.random.default_rng(s).normal(size=shape).astype(np.float32)
  a[..., 0] += skew                       # most tokens prefer expert 0: greedy would overload it
  expert = np.asarray(assign(jnp.asarray(a)))
  for i in range(g):
    np.testing.assert_array_equal(np.bincount(expert[i], minlength=e), np.full(e, s // e))
    total = a[i, np.arange(s), expert[i]].astype(np.float64).sum()
    opt = scipy_optimum(a[i])
    # Exact solver: only float32 round-off separates the totals.
    assert abs(total - opt) <= 1e-5 * np.abs(a[i]).sum(), (total, opt)


def test_balanced_assignment_ties_and_nonfinite():
  # Integer scores with many ties, k = S/E = 4: the optimum is reached exactly.
  a = np.random.default_rng(0).integers(0, 3, size=(4, 24, 4)).astype(np.float32)
  expert = np.asarray(assign(jnp.asarray(a)))
  for i in range(4):
    assert a[i, np.arange(24), expert[i]].sum() == scipy_optimum(a[i])
    assert (np.bincount(expert[i], minlength=4) == 6).all()
  # -inf scores (as fairseq: replaced by the group minimum) still give a balanced answer.
  a[0, :, 1] = -np.inf
  expert = np.asarray(assign(jnp.asarray(a)))
  assert (np.bincount(expert[0], minlength=4) == 6).all()


def test_s_not_divisible_by_e_is_a_clear_error():
  with pytest.raises(ValueError, match='not divisible by E=4'):
    base_layers.balanced_assignment(jnp.zeros((1, 10, 4)))


def test_base_routing_train_and_eval():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 8, 4)).astype(np.float32) + np.array([2.0, 0, 0, 0]))

  def gate_sum(l, train):
    r = base_layers.base_routing(l, train=train)
    return jnp.sum(r.slot_weight), r

  fn = jax.jit(lambda l: (jax.value_and_grad(gate_sum, has_aux=True)(l, True),
                          base_layers.base_routing(l, train=False)))
  ((_, r), grad), r_eval = fn(logits)
  assert r.capacity == 2 and abs(float(r.metrics['dropped_fraction'])) < 1e-6
  expert = np.asarray(r.token_expert[..., 0])
  np.testing.assert_array_equal(np.bincount(expert.ravel(), minlength=4), [4, 4, 4, 4])
  chosen = np.take_along_axis(np.asarray(logits), expert[..., None], -1)[..., 0]
  sig = 1 / (1 + np.exp(-chosen))
  np.testing.assert_allclose(np.asarray(r.token_weight[..., 0]), sig, rtol=1e-6)
  # Gradient only through the gate σ(A[t, e_t]): σ' at the chosen entries, 0 elsewhere.
  want = np.zeros((2, 8, 4))
  np.put_along_axis(want, expert[..., None], (sig * (1 - sig))[..., None], -1)
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-7)
  assert r.aux_losses == {}
  r = r_eval                                                   # evaluation: greedy top-1
  np.testing.assert_array_equal(np.asarray(r.token_expert[..., 0]), np.argmax(np.asarray(logits), -1))
  assert r.capacity == 8 and abs(float(r.metrics['dropped_fraction'])) < 1e-6

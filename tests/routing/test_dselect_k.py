"""DSelect-k against a numpy reference written from the paper / official code formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers.engines import EinsumEngine, GatherEngine
from moe_jax.routing import dselect_k as ds

# One compilation per configuration instead of op-by-op dispatch (much cheaper on CPU).
dselect_k = jax.jit(ds.dselect_k, static_argnames=(
    'num_experts', 'gamma', 'entropy_weight', 'reachability_weight', 'sparse', 'capacity'))
expert_weights = jax.jit(ds.expert_weights, static_argnames=('num_experts', 'gamma'))


@jax.jit
def apply_both_engines(x, r, mats):
  """Both engines with experts f_e(x) = x · mats[e]."""
  fn = lambda buf: jnp.einsum('end,edf->enf', buf, mats)
  return EinsumEngine().apply(x, r, fn), GatherEngine().apply(x, r, fn)


def np_smooth_step(t, gamma):
  out = []
  for v in np.ravel(t):
    if v <= -gamma / 2:
      out.append(0.0)
    elif v >= gamma / 2:
      out.append(1.0)
    else:
      out.append(-2 / gamma ** 3 * v ** 3 + 3 / (2 * gamma) * v + 0.5)
  return np.array(out).reshape(np.shape(t))


def np_selector(z, num_experts, gamma):
  """z: [m] -> r [E], r_e = Π_j S(z_j) if bit j of e (MSB first) is 1 else 1 - S(z_j)."""
  m = len(z)
  s = np_smooth_step(z, gamma)
  r = np.ones(num_experts)
  for e in range(num_experts):
    code = np.binary_repr(e, width=m)
    for j in range(m):
      r[e] *= s[j] if code[j] == '1' else 1 - s[j]
  return r


def np_q(z, w, num_experts, gamma):
  """z: [k, m], w: [k] -> (q [E], r [k, E])."""
  r = np.stack([np_selector(zi, num_experts, gamma) for zi in z])
  alpha = np.exp(w - w.max()) / np.exp(w - w.max()).sum()
  return alpha @ r, r


@pytest.mark.parametrize('gamma', [1.0, 0.4])
def test_smooth_step_matches_numpy_and_is_c1(gamma):
  t = np.concatenate([np.linspace(-1, 1, 41), [-gamma / 2, gamma / 2, 0.0]]).astype(np.float32)
  values, grads = jax.jit(lambda t: (ds.smooth_step(t, gamma), jax.vmap(
      jax.grad(lambda v: ds.smooth_step(v, gamma)))(t)))(jnp.array(t))
  np.testing.assert_allclose(values, np_smooth_step(t, gamma), atol=1e-6)
  # C¹: the derivative vanishes at both ends of the transition band (and outside it).
  np.testing.assert_allclose(grads[-3:-1], 0.0, atol=1e-5)
  np.testing.assert_allclose(grads[np.abs(t) > gamma / 2], 0.0)
  assert float(grads[-1]) == pytest.approx(3 / (2 * gamma), rel=1e-5)


def test_binary_codes_are_msb_first():
  codes = np.array(ds.binary_codes(5))
  expected = np.array([[int(b) for b in np.binary_repr(e, width=3)] for e in range(5)], bool)
  np.testing.assert_array_equal(codes, expected)
  assert ds.num_code_bits(8) == 3 and ds.num_code_bits(9) == 4 and ds.num_code_bits(1) == 0


@pytest.mark.parametrize('num_experts', [4, 6])
def test_expert_weights_and_regularisers_match_numpy(num_experts):
  k, gamma = 3, 1.0
  m = ds.num_code_bits(num_experts)
  rng = np.random.default_rng(num_experts)
  z = rng.uniform(-0.8, 0.8, size=(5, k, m)).astype(np.float32)
  w = rng.normal(size=(5, k)).astype(np.float32)
  q, r = expert_weights(jnp.array(z), jnp.array(w), num_experts, gamma)
  ref = [np_q(z[i], w[i], num_experts, gamma) for i in range(5)]
  np.testing.assert_allclose(q, np.stack([a for a, _ in ref]), atol=1e-6)
  np.testing.assert_allclose(r, np.stack([b for _, b in ref]), atol=1e-6)
  total = np.array(q).sum(-1)
  if num_experts == 4:
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
  else:
    assert np.all(total <= 1 + 1e-6) and np.any(total < 0.999)
  rr = np.stack([b for _, b in ref])
  entropy = np.mean(np.sum(-np.sum(rr * np.log(rr + 1e-6), -1), -1))
  reach = np.mean(np.sum(1 / np.maximum(rr.sum(-1), 1e-6), -1))
  assert float(ds.selector_entropy(r)) == pytest.approx(entropy, rel=1e-5)
  assert float(ds.reachability_penalty(r)) == pytest.approx(reach, rel=1e-5)


# Every routing test uses E = 6, k = 3, G = 2, S = 7 so that jit compiles each form once.
E, K, G, S = 6, 3, 2, 7


def _routing_inputs(num_experts=E, k=K, g=G, s=S, spread=0.8, seed=0):
  m = ds.num_code_bits(num_experts)
  rng = np.random.default_rng(seed)
  z = rng.uniform(-spread, spread, size=(g, s, k, m)).astype(np.float32)
  w = rng.normal(size=(g, s, k)).astype(np.float32)
  return z, w


def test_dense_training_routing_mixes_every_expert_with_q():
  e = E
  z, w = _routing_inputs()
  r = dselect_k(jnp.array(z), jnp.array(w), num_experts=e)      # λ = 1e-6, reachability 1
  q = np.stack([[np_q(z[g, s], w[g, s], e, 1.0)[0] for s in range(S)] for g in range(G)])
  _, combine = r.dense()                                      # [G, S, E, C=S]
  np.testing.assert_allclose(np.einsum('gses->gse', np.array(combine)), q, atol=1e-6)
  assert np.array(combine).sum() == pytest.approx(q.sum(), rel=1e-5)   # nothing off-diagonal
  rr = np.stack([[np_q(z[g, s], w[g, s], e, 1.0)[1] for s in range(S)] for g in range(G)])
  ent = np.mean(np.sum(-np.sum(rr * np.log(rr + 1e-6), -1), -1))
  assert float(r.aux_losses['selector_entropy']) == pytest.approx(1e-6 * ent, rel=1e-5)
  assert float(r.aux_losses['reachability']) == pytest.approx(
      np.mean(np.sum(1 / np.maximum(rr.sum(-1), 1e-6), -1)), rel=1e-5)
  assert float(r.metrics['dropped_fraction']) == 0.0
  # Output = Σ_e q_e f_e(x) through both engines, f_e(x) = x · A_e.
  x = jnp.array(np.random.default_rng(1).normal(size=(G, S, 3)), jnp.float32)
  mats = jnp.array(np.random.default_rng(2).normal(size=(e, 3, 3)), jnp.float32)
  expected = np.einsum('gse,gsd,edf->gsf', q, np.array(x), np.array(mats))
  for y in apply_both_engines(x, r, mats):
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_no_regulariser_for_power_of_two_and_zero_weights():
  z, w = _routing_inputs(8)
  # Only the dict keys matter: trace without compiling.
  r = jax.eval_shape(lambda z, w: ds.dselect_k(z, w, num_experts=8, entropy_weight=0.0), z, w)
  assert r.aux_losses == {}
  assert 'reachability_loss' not in r.metrics


def test_eval_routing_at_convergence_uses_at_most_k_experts():
  e, k = E, K
  z, w = _routing_inputs(seed=3)
  # Converged selectors: every z outside the smooth band, so each r is one-hot, on a
  # reachable code (an expert index < E).
  rng = np.random.default_rng(6)
  codes = np.array(ds.binary_codes(e))[rng.integers(0, e, size=z.shape[:3])]   # [G, S, k, m]
  z = np.where(codes, 1.0, -1.0) * (0.5 + np.abs(z))
  dense = dselect_k(jnp.array(z), jnp.array(w), num_experts=e)
  sparse = dselect_k(jnp.array(z), jnp.array(w), num_experts=e, sparse=True)
  q = np.array(dense.token_weight)
  nonzero = (q > 0).sum(-1)
  assert nonzero.max() <= k and nonzero.min() >= 1
  # The sparse slot table, scattered back to [G, S, E] in numpy, holds exactly q.
  slot_token, slot_weight = np.array(sparse.slot_token), np.array(sparse.slot_weight)
  scattered = np.zeros((G, S + 1, e))
  for g in range(G):
    for ex in range(e):
      np.add.at(scattered[g, :, ex], slot_token[g, ex], slot_weight[g, ex])
  np.testing.assert_allclose(scattered[:, :S], q, atol=1e-7)
  assert ((slot_token < S).sum(axis=(1, 2)) == nonzero.sum(-1)).all()   # one slot per q_e > 0
  assert float(sparse.metrics['truncated_weight']) == 0.0


def test_eval_routing_before_convergence_reports_truncated_weight():
  z, w = _routing_inputs(spread=0.1)
  r = dselect_k(jnp.array(z), jnp.array(w), num_experts=E, sparse=True)
  q = np.stack([[np_q(z[g, s], w[g, s], E, 1.0)[0] for s in range(S)] for g in range(G)])
  top = -np.sort(-q, axis=-1)[..., :K]
  assert float(r.metrics['truncated_weight']) == pytest.approx(
      np.mean(q.sum(-1) - top.sum(-1)), rel=1e-4)
  assert float(r.metrics['truncated_weight']) > 0.1


def test_saturated_selectors_get_no_gradient():
  """S' = 0 outside (-γ/2, γ/2): a binary selector is locked, only α keeps learning."""
  z = jnp.array([[0.6, -0.7, 2.0], [-0.5, 0.9, -3.0]])           # k = 2 binary selectors
  w = jnp.array([0.3, -0.2])
  target = jnp.arange(8.0)
  grads = jax.jit(jax.grad(lambda z, w: jnp.sum(
      (expert_weights(z, w, 8, 1.0)[0] - target / 28) ** 2), argnums=(0, 1)))(z, w)
  np.testing.assert_array_equal(grads[0], 0.0)
  assert np.abs(np.array(grads[1])).max() > 0


def test_gradient_descent_reaches_a_binary_selection():
  """From the official initialisation, plain gradient descent on a regression whose
  optimum is one expert drives every selector out of the smooth band onto that expert."""
  e, k, d = 8, 2, 4
  m = ds.num_code_bits(e)
  rng = np.random.default_rng(1)
  basis = jnp.array(rng.normal(size=(e, d)), jnp.float32)
  target = basis[5]

  def loss(p):
    q, r = ds.expert_weights(p['z'], p['w'], e)
    return jnp.sum((q @ basis - target) ** 2) + 1e-3 * ds.selector_entropy(r)

  @jax.jit
  def train(p0):
    step = lambda p, _: (jax.tree.map(lambda a, b: a - 0.3 * b, p, jax.grad(loss)(p)), None)
    p = jax.lax.scan(step, p0, None, length=400)[0]
    return p, ds.expert_weights(p0['z'], p0['w'], e)[0], ds.expert_weights(p['z'], p['w'], e)

  # The official initialisation: z ~ U(-γ/100, γ/100), w ~ U(-0.05, 0.05).
  p0 = dict(z=jnp.array(rng.uniform(-0.01, 0.01, (k, m)), jnp.float32),
            w=jnp.array(rng.uniform(-0.05, 0.05, (k,)), jnp.float32))
  p, q0, (q, r) = train(p0)
  assert int((np.array(q0) > 0).sum()) == e                        # dense at initialisation
  assert np.all(np.abs(np.array(p['z'])) >= 0.5)                  # all out of the band
  assert np.all(np.isin(np.array(r), [0.0, 1.0]))
  np.testing.assert_array_equal(np.array(q), np.eye(e)[5])

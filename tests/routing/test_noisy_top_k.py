"""Noisy top-k gating against a numpy/scipy reference written from Shazeer et al. 2017
(eqs. 3-5 and 8-11: KeepTopK, softmax over the kept, kth_excluding, Φ, CV²)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from moe_jax.routing.noisy_top_k import noisy_top_k

_JITTED = {}


def run(fn, *arrays, **options):
  """fn(*arrays, **options) compiled once per options (eager JAX compiles op by op,
  which is far slower on a loaded CPU)."""
  key = (fn, tuple(sorted(options.items())))
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda *a: fn(*a, **options))
  return _JITTED[key](*arrays)


def combine_of(r):
  """[G, S, E] combine weights from the slot table, in numpy."""
  slot_token, slot_weight = np.asarray(r.slot_token), np.asarray(r.slot_weight)
  g, e, c = slot_token.shape
  out = np.zeros((g, r.num_tokens + 1, e))
  for gi in range(g):
    for ei in range(e):
      out[gi, slot_token[gi, ei], ei] += slot_weight[gi, ei]
  return out[:, :-1]


def softplus(v):
  return np.log1p(np.exp(v))


def kth_excluding(v, k, i):
  """The k-th highest component of v, leaving out component i (paper, eq. 9)."""
  return np.sort(np.delete(v, i))[::-1][k - 1]


def cv2(v):
  return np.var(v) / (np.mean(v) ** 2 + 1e-10)   # population variance (t2t)


def reference(clean, raw_noise, eps, k, noise_epsilon=1e-2):
  """Per group: gates [S, E], importance loss, load loss (noisy when eps is given)."""
  s, e = clean.shape
  std = softplus(raw_noise) + noise_epsilon if eps is not None else None
  h = clean + eps * std if eps is not None else clean
  gates = np.zeros((s, e))
  for t in range(s):
    top = np.argsort(-h[t])[:k]
    z = np.exp(h[t, top] - h[t, top].max())
    gates[t, top] = z / z.sum()
  if eps is not None and k < e:
    p = np.array([[norm.cdf((clean[t, i] - kth_excluding(h[t], k, i)) / std[t, i])
                   for i in range(e)] for t in range(s)])
    load = p.sum(0)
  else:
    load = (gates > 0).sum(0).astype(float)
  return gates, cv2(gates.sum(0)), cv2(load)


def _inputs(g=2, s=12, e=5, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(g, s, e)).astype(np.float32),
          (rng.normal(size=(g, s, e)) * 0.5).astype(np.float32),
          rng.normal(size=(g, s, e)).astype(np.float32))


def test_training_gates_and_losses_match_reference():
  clean, raw, eps = _inputs()
  k = 3
  r = run(noisy_top_k, clean, raw, eps, k=k, importance_weight=0.3, load_weight=0.7)
  combine = combine_of(r)
  imp, load = [], []
  for gi in range(clean.shape[0]):
    gates, li, ll = reference(clean[gi], raw[gi], eps[gi], k)
    np.testing.assert_allclose(combine[gi], gates, atol=1e-5)
    imp.append(li)
    load.append(ll)
  np.testing.assert_allclose(float(r.aux_losses['importance']), 0.3 * np.mean(imp), rtol=1e-4)
  np.testing.assert_allclose(float(r.aux_losses['load']), 0.7 * np.mean(load), rtol=1e-4)
  # Default capacity C = S: the paper drops nothing.
  assert r.capacity == clean.shape[1] and abs(float(r.metrics['dropped_fraction'])) < 1e-6


def test_eval_is_softmax_over_clean_top_k_and_load_counts():
  clean, _, _ = _inputs(seed=1)
  r = run(noisy_top_k, clean, k=1)
  combine = combine_of(r)
  refs = [reference(clean[gi], None, None, 1) for gi in range(2)]
  for gi in range(2):
    np.testing.assert_allclose(combine[gi], refs[gi][0], atol=1e-5)
  np.testing.assert_allclose(float(r.aux_losses['importance']),
                             0.1 * np.mean([ref[1] for ref in refs]), rtol=1e-4)
  np.testing.assert_allclose(float(r.aux_losses['load']),
                             0.1 * np.mean([ref[2] for ref in refs]), rtol=1e-4)


def test_smooth_load_gives_gradients_to_both_weight_matrices():
  clean, raw, eps = _inputs(seed=2)
  smooth = lambda c, n: noisy_top_k(c, n, eps, k=2, load_weight=1.0).aux_losses['load']
  gc, gn = jax.jit(jax.grad(smooth, argnums=(0, 1)))(clean, raw)
  assert float(np.abs(gc).sum()) > 1e-3 and float(np.abs(gn).sum()) > 1e-3


def test_capacity_factor_limits_slots():
  clean, raw, eps = _inputs(s=16, e=4)
  shape = lambda **kw: jax.eval_shape(lambda *a: noisy_top_k(*a, k=2, **kw), clean, raw, eps)
  assert shape(capacity_factor=1.0).capacity == 8   # ceil(2 * 16 * 1.0 / 4)
  assert shape(capacity_factor=1.0, capacity_multiple_of=3).capacity == 9
  assert shape(capacity=5).capacity == 5
  with pytest.raises(ValueError, match='k=5'):
    noisy_top_k(clean, k=5)

"""Routing metrics on hand-built cases and against numpy/scipy."""
import functools

import jax
import numpy as np
import scipy.special
import scipy.stats

from moe_jax import routing

jit = functools.partial(jax.jit, compiler_options=dict(xla_backend_optimization_level=0,
                                                       xla_cpu_use_fusion_emitters=False))


def test_sparse_metrics_hand_built():
  # S=4 tokens, E=2 experts, C=2. Expert 0 holds tokens 0 and 1, expert 1 holds token 0
  # and one empty slot (4). 5 assignments were requested, 3 got a slot.
  slot_token = np.array([[[0, 1], [0, 4]]], np.int32)
  probs = np.array([[[0.5, 0.5], [1.0, 0.0], [0.9, 0.1], [0.2, 0.8]]], np.float32)
  m = jit(lambda st, p: routing.sparse_metrics(st, 4, p, num_requested=5))(slot_token, probs)
  np.testing.assert_allclose(m['dropped_fraction'], 1 - 3 / 5, rtol=1e-6)
  np.testing.assert_allclose(m['unrouted_fraction'], 2 / 4)          # tokens 2 and 3
  np.testing.assert_allclose(m['expert_load'], [2 / 3, 1 / 3], rtol=1e-6)
  np.testing.assert_allclose(m['router_entropy'], scipy.stats.entropy(probs[0], axis=-1).mean(),
                             rtol=1e-6)   # includes a 0·log 0 = 0 term


def test_token_choice_metrics_vs_numpy():
  g, s, e, k, c = 3, 10, 4, 2, 2
  logits = (2 * np.random.default_rng(0).normal(size=(g, s, e))).astype(np.float32)
  r, (dispatch, _) = jit(lambda l: (lambda r: (r, r.dense()))(
      routing.tokens_choice(l, k=k, capacity=c)))(logits)
  dispatch = np.asarray(dispatch)                                     # [G, S, E, C]
  kept_per_token = dispatch.sum((2, 3))
  np.testing.assert_allclose(r.metrics['dropped_fraction'], 1 - dispatch.sum() / (g * s * k),
                             rtol=1e-6)
  np.testing.assert_allclose(r.metrics['unrouted_fraction'], np.mean(kept_per_token == 0),
                             rtol=1e-6)
  load = dispatch.sum((0, 1, 3))
  np.testing.assert_allclose(r.metrics['expert_load'], load / load.sum(), rtol=1e-6)
  probs = scipy.special.softmax(logits.astype(np.float64), -1)
  np.testing.assert_allclose(r.metrics['router_entropy'],
                             scipy.stats.entropy(probs, axis=-1).mean(), rtol=1e-5)


def test_dense_metrics_hand_built():
  # Expert 0 gets dispatch mass 3, expert 1 mass 1.
  dispatch = np.zeros((1, 2, 2, 1), np.float32)
  dispatch[0, :, 0, 0] = 1.5
  dispatch[0, 0, 1, 0] = 1.0
  uniform = np.full((1, 2, 4), 0.25, np.float32)
  m = jit(routing.dense_metrics)(dispatch, uniform)
  np.testing.assert_allclose(m['expert_load'], [0.75, 0.25], rtol=1e-6)
  np.testing.assert_allclose(m['router_entropy'], np.log(4), rtol=1e-6)
  assert float(m['dropped_fraction']) == float(m['unrouted_fraction']) == 0.0

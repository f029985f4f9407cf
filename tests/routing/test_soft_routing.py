"""Soft MoE routing weights (Puigcerver et al. 2023, eqs. 1 and 3): dispatch D is the
softmax of the logits over the tokens m (per slot), combine C the softmax over all n·p
slots jointly (per token)."""
import functools

import jax
import numpy as np
import scipy.special
import scipy.stats

from moe_jax import routing

jit = functools.partial(jax.jit, compiler_options=dict(xla_backend_optimization_level=0,
                                                       xla_cpu_use_fusion_emitters=False))


def test_dispatch_and_combine_softmaxes():
  g, m, n, p = 2, 5, 3, 2
  logits = (2 * np.random.default_rng(0).normal(size=(g, m, n, p))).astype(np.float32)
  r = jit(routing.soft_moe)(logits)
  assert not r.is_sparse and (r.num_experts, r.capacity, r.num_tokens) == (n, p, m)
  x = logits.astype(np.float64)
  dispatch = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)                  # over tokens
  combine = np.exp(x) / np.exp(x).sum(axis=(2, 3), keepdims=True)              # over n·p slots
  np.testing.assert_allclose(r.dispatch_weights, dispatch, rtol=1e-5)
  np.testing.assert_allclose(r.combine_weights, combine, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(r.dispatch_weights).sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(r.combine_weights).sum((2, 3)), 1.0, rtol=1e-6)
  # Metrics: nothing dropped; each slot has dispatch mass 1, so the load is uniform;
  # the entropy is that of each token's combine distribution over the n·p slots.
  assert float(r.metrics['dropped_fraction']) == 0.0
  assert float(r.metrics['unrouted_fraction']) == 0.0
  np.testing.assert_allclose(r.metrics['expert_load'], np.full(n, 1 / n), rtol=1e-6)
  ent = scipy.stats.entropy(combine.reshape(g * m, n * p), axis=-1).mean()
  np.testing.assert_allclose(r.metrics['router_entropy'], ent, rtol=1e-5)
  assert r.aux_losses == {}


def test_softmax_is_stable_for_large_logits():
  logits = np.zeros((1, 4, 2, 1), np.float32)
  logits[0, 1, 0, 0] = 500.0
  r = jit(routing.soft_moe)(logits)
  assert np.all(np.isfinite(r.dispatch_weights)) and np.all(np.isfinite(r.combine_weights))
  np.testing.assert_allclose(r.dispatch_weights[0, :, 0, 0], [0, 1, 0, 0], atol=1e-6)
  np.testing.assert_allclose(r.combine_weights[0, 1, :, 0], [1, 0], atol=1e-6)

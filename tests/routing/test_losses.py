"""Auxiliary losses against numpy references written from the papers.

* Switch (Fedus et al. 2021, eq. 4-6): L = α · E · Σ_i f_i · P_i, with f_i the fraction
  of tokens whose argmax (pre-capacity) is expert i and P_i the mean router probability.
  f carries no gradient.
* ST-MoE (Zoph et al. 2022, eq. 5): L_z = mean over tokens of (log Σ_j exp h_j)².
* Importance (Shazeer et al. 2017; V-MoE A.2): CV² of the per-expert sum of gates, with
  the population variance.
Losses are computed per routing group and averaged over groups.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from moe_jax import routing

jit = functools.partial(jax.jit, compiler_options=dict(xla_backend_optimization_level=0,
                                                       xla_cpu_use_fusion_emitters=False))
STATIC = ('k', 'capacity', 'balance_count', 'load_balance_weight', 'z_loss_weight',
          'importance_weight')
tokens_choice = jit(routing.tokens_choice, static_argnames=STATIC)
G, S, E = 2, 12, 4
# One set of options for most tests, so they share one compilation.
WEIGHTS = dict(load_balance_weight=1e-2, z_loss_weight=1e-3, importance_weight=5e-3)


def np_softmax(x):
  return scipy.special.softmax(np.asarray(x, np.float64), axis=-1)


def np_switch_loss(logits):
  """E · Σ f·P per group, averaged; f from the pre-capacity argmax."""
  probs = np_softmax(logits)
  g, s, e = probs.shape
  out = []
  for gi in range(g):
    f = np.bincount(np.argmax(probs[gi], -1), minlength=e) / s
    p = probs[gi].mean(0)
    out.append(e * np.sum(f * p))
  return np.mean(out)


def np_switch_loss_grad(logits):
  """d/dlogits of mean_g E·Σ_i f_i·P_i with f held constant.

  P_i = (1/S) Σ_s p_si and dp_si/dh_sj = p_si (δ_ij − p_sj), so
  dL/dh_sj = (E / (G·S)) · p_sj · (f_j − Σ_i f_i p_si).
  """
  probs = np_softmax(logits)
  g, s, e = probs.shape
  grad = np.zeros_like(probs)
  for gi in range(g):
    f = np.bincount(np.argmax(probs[gi], -1), minlength=e) / s
    p = probs[gi]
    grad[gi] = e / (g * s) * p * (f[None, :] - (p @ f)[:, None])
  return grad


def random_logits(seed):
  return (2 * np.random.default_rng(seed).normal(size=(G, S, E))).astype(np.float32)


def test_switch_loss_is_alpha_at_uniform_routing():
  # Token s puts almost all its mass on expert s mod E: f = P = 1/E exactly.
  logits = 20.0 * np.eye(E, dtype=np.float32)[np.arange(S) % E][None].repeat(G, 0)
  r = tokens_choice(logits, k=2, capacity=3, **WEIGHTS)
  np.testing.assert_allclose(r.aux_losses['load_balancing'], 1e-2, rtol=1e-6)
  np.testing.assert_allclose(r.metrics['load_balancing_loss'], 1.0, rtol=1e-6)


def test_switch_loss_is_alpha_times_e_when_collapsed():
  logits = np.zeros((G, S, E), np.float32)
  logits[..., 2] = 200.0   # p = one-hot(2) for every token
  r = tokens_choice(logits, k=2, capacity=3, **WEIGHTS)
  np.testing.assert_allclose(r.aux_losses['load_balancing'], 1e-2 * E, rtol=1e-6)


@pytest.mark.parametrize('k', [1, 2])
def test_switch_loss_matches_numpy_with_pre_capacity_counts(k):
  logits = random_logits(0)
  # capacity=3 drops many assignments: f must still count the pre-capacity argmax
  # (top-1 only, also for k=2: Switch, GShard, mesh-tf).
  r = tokens_choice(logits, k=k, capacity=3, **WEIGHTS)
  np.testing.assert_allclose(r.aux_losses['load_balancing'], 1e-2 * np_switch_loss(logits),
                             rtol=1e-5)
  assert float(r.metrics['dropped_fraction']) > 0.1


def test_switch_loss_topk_count():
  """balance_count='topk' (Megatron): f_i = count of i among all k choices / (S·k)."""
  logits = random_logits(1)
  probs = np_softmax(logits)
  expected = []
  for g in range(G):
    top2 = np.argsort(-probs[g], -1, kind='stable')[:, :2]
    f = np.bincount(top2.ravel(), minlength=E) / (S * 2)
    expected.append(E * np.sum(f * probs[g].mean(0)))
  r = tokens_choice(logits, k=2, capacity=3, balance_count='topk', **WEIGHTS)
  np.testing.assert_allclose(r.aux_losses['load_balancing'], 1e-2 * np.mean(expected), rtol=1e-5)


def test_switch_loss_gradient_treats_f_as_constant():
  logits = random_logits(2)
  loss = lambda h: routing.tokens_choice(h, k=1, capacity=3,
                                         load_balance_weight=1.0).aux_losses['load_balancing']
  grad = jit(jax.grad(loss))(logits)
  np.testing.assert_allclose(grad, np_switch_loss_grad(logits), rtol=1e-4, atol=1e-7)


def test_z_loss_matches_numpy():
  logits = random_logits(3) * 1.5
  expected = np.mean(scipy.special.logsumexp(logits.astype(np.float64), axis=-1) ** 2)
  np.testing.assert_allclose(jit(routing.router_z_loss)(logits), expected, rtol=1e-5)
  r = tokens_choice(logits, k=2, capacity=3, **WEIGHTS)
  np.testing.assert_allclose(r.aux_losses['router_z'], 1e-3 * expected, rtol=1e-5)
  np.testing.assert_allclose(r.metrics['router_z_loss'], expected, rtol=1e-5)


def test_z_loss_of_zero_logits_is_log_e_squared():
  np.testing.assert_allclose(jit(routing.router_z_loss)(np.zeros((G, S, E), np.float32)),
                             np.log(E) ** 2, rtol=1e-6)


def test_importance_loss_matches_numpy_population_cv2():
  logits = random_logits(4)
  importance = np_softmax(logits).sum(axis=1)    # [G, E]
  cv2 = np.mean(importance.var(axis=-1, ddof=0) / importance.mean(axis=-1) ** 2)
  probs = np_softmax(logits).astype(np.float32)
  np.testing.assert_allclose(jit(routing.importance_loss)(probs), cv2, rtol=1e-5)
  r = tokens_choice(logits, k=2, capacity=3, **WEIGHTS)
  np.testing.assert_allclose(r.aux_losses['importance'], 5e-3 * cv2, rtol=1e-5)


def test_cv_squared_uses_population_variance():
  # [1, 3]: mean 2, population variance 1 -> 0.25 (the sample variance would give 0.5).
  cv2 = jit(routing.cv_squared)(np.array([[1.0, 3.0], [2.5, 2.5]], np.float32))
  np.testing.assert_allclose(cv2, [0.25, 0.0], atol=1e-7)


def test_zero_weight_losses_are_left_out():
  shape = jax.ShapeDtypeStruct((G, S, E), jnp.float32)
  r = jax.eval_shape(functools.partial(routing.tokens_choice, load_balance_weight=0.0), shape)
  assert r.aux_losses == {}
  # The unweighted values stay available for logging.
  assert set(r.metrics) >= {'load_balancing_loss', 'router_z_loss', 'importance_loss'}
  r = jax.eval_shape(functools.partial(routing.tokens_choice, **WEIGHTS), shape)
  assert set(r.aux_losses) == {'load_balancing', 'router_z', 'importance'}

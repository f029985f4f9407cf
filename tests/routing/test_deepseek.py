"""DeepSeek-V3 routing against a numpy transcription of the paper's eqs. (12)-(20) and
of the official inference `Gate` (group-limited top-k, route_scale)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.routing.deepseek import (deepseek_routing, group_limited_top_k, sequence_balance_loss,
                                      update_expert_bias)

_JITTED = {}


def run(fn, *arrays, **options):
  """fn(*arrays, **options) compiled once per options (eager JAX compiles op by op,
  which is far slower on a loaded CPU)."""
  key = (fn, tuple(sorted(options.items())))
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda *a: fn(*a, **options))
  return _JITTED[key](*arrays)


def sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


def gate_reference(logits, bias, k, n_groups, topk_groups, route_scale):
  """Per token: selected experts and gates (V3 Gate.forward, with bias)."""
  s = sigmoid(logits)                                      # [T, E]
  biased = s + bias
  t, e = s.shape
  experts, gates = [], []
  for row, brow in zip(s, biased):
    eligible = brow.copy()
    if n_groups > 1:
      grouped = brow.reshape(n_groups, -1)
      gscore = np.sort(grouped, -1)[:, ::-1][:, :2].sum(-1)
      keep = np.argsort(-gscore)[:topk_groups]
      mask = np.repeat(~np.isin(np.arange(n_groups), keep), e // n_groups)
      eligible[mask] = -np.inf
    idx = np.argsort(-eligible)[:k]
    w = row[idx] / row[idx].sum() * route_scale
    experts.append(idx)
    gates.append(w)
  return np.array(experts), np.array(gates)


def seq_loss_reference(scores, topk_sets, alpha):
  """α Σ_i f_i P_i for one sequence; f_i = N_r/(K_r T) Σ_t 1[i ∈ TopK_t], P from s'."""
  t, e = scores.shape
  k = topk_sets.shape[-1]
  f = np.array([np.sum(topk_sets == i) for i in range(e)]) * e / (k * t)
  p = (scores / scores.sum(-1, keepdims=True)).mean(0)
  return alpha * np.sum(f * p)


def test_gate_matches_v3_reference():
  # Group-limited (V3-like: 4 groups of 2, 2 kept); n_groups=1 is covered by the tests below.
  n_groups, topk_groups, k = 4, 2, 3
  rng = np.random.default_rng(n_groups)
  g, s, e = 2, 6, 8
  logits = rng.normal(size=(g, s, e)).astype(np.float32)
  bias = (rng.normal(size=e) * 0.3).astype(np.float32)
  r = run(deepseek_routing, logits, bias, k=k, n_groups=n_groups, topk_groups=topk_groups)
  for gi in range(g):
    idx, w = gate_reference(logits[gi].astype(np.float64), bias, k, n_groups, topk_groups, 2.5)
    np.testing.assert_array_equal(np.asarray(r.token_expert)[gi], idx)
    np.testing.assert_allclose(np.asarray(r.token_weight)[gi], w, rtol=1e-5)
  assert r.capacity == s and abs(float(r.metrics['dropped_fraction'])) < 1e-6   # no dropping


def test_bias_changes_selection_only():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(1, 10, 6)).astype(np.float32)
  bias = np.zeros(6, np.float32)
  bias[5] = 10.0
  @jax.jit
  def outputs(z, b):
    r = deepseek_routing(z, b, k=2)
    grad = jax.grad(lambda bb: jnp.sum(deepseek_routing(z, bb, k=2).token_weight))(b)
    return r.token_expert, r.token_weight, grad
  idx, weight, grad = (np.asarray(a) for a in outputs(logits, bias))
  assert np.all(idx[0, :, 0] == 5)                               # forced into the top-2
  s = sigmoid(logits[0].astype(np.float64))
  sel = np.take_along_axis(s, idx[0], -1)
  np.testing.assert_allclose(weight[0], 2.5 * sel / sel.sum(-1, keepdims=True), rtol=1e-5)
  assert np.abs(grad).sum() == 0.0                               # no gradient into b


@pytest.mark.parametrize('balance_count', ['unbiased', 'selected'])
def test_sequence_balance_loss(balance_count):
  rng = np.random.default_rng(4)
  g, t, e, k = 3, 12, 6, 2
  logits = rng.normal(size=(g, t, e)).astype(np.float32)
  bias = np.zeros(e, np.float32)
  bias[0] = 5.0                      # the biased selection differs from the unbiased top-k
  r = run(deepseek_routing, logits, bias, k=k, seq_balance_weight=0.5,
             balance_count=balance_count)
  s = sigmoid(logits.astype(np.float64))
  ref = []
  for gi in range(g):
    sets = (np.argsort(-s[gi], -1)[:, :k] if balance_count == 'unbiased'
            else np.argsort(-(s[gi] + bias), -1)[:, :k])
    ref.append(seq_loss_reference(s[gi], sets, 0.5))
  np.testing.assert_allclose(float(r.aux_losses['seq_balance']), np.mean(ref), rtol=1e-5)


def test_sequence_balance_loss_is_one_at_perfect_balance():
  idx = np.asarray([[[0, 1], [2, 3], [1, 0], [3, 2]]])        # every expert twice
  scores = np.full((1, 4, 4), 0.3, np.float32)
  np.testing.assert_allclose(float(jax.jit(sequence_balance_loss)(scores, idx)), 1.0, rtol=1e-6)


def test_update_expert_bias_sign_rule():
  bias = np.asarray([0.0, 0.5, -0.5, 0.0], np.float32)
  update = jax.jit(update_expert_bias)
  np.testing.assert_allclose(np.asarray(update(bias, np.asarray([10, 2, 4, 4]), 1e-3)),  # mean 5
                             [-1e-3, 0.5 + 1e-3, -0.5 + 1e-3, 1e-3], atol=1e-7)
  np.testing.assert_array_equal(np.asarray(update(bias, np.full(4, 3), 1e-3)), bias)


def test_group_limit_properties_and_errors():
  rng = np.random.default_rng(5)
  scores = rng.uniform(size=(50, 16)).astype(np.float32)
  top = jax.jit(group_limited_top_k, static_argnames=('k', 'n_groups', 'topk_groups'))
  idx = np.asarray(top(scores, k=4, n_groups=4, topk_groups=2))
  assert all(len(set(row // 4)) <= 2 for row in idx)
  assert any(len(set(row // 4)) == 2 for row in idx)
  with pytest.raises(ValueError, match='divide'):
    top(scores, k=2, n_groups=3, topk_groups=1)
  with pytest.raises(ValueError, match='raise topk_groups'):
    top(scores, k=9, n_groups=4, topk_groups=2)
  with pytest.raises(ValueError, match='k=20'):
    jax.eval_shape(lambda z: deepseek_routing(z, k=20), scores[None])


def test_softmax_variant_is_not_renormalised():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(1, 5, 6)).astype(np.float32)
  r = run(deepseek_routing, logits, k=2, score_func='softmax', route_scale=1.0)
  p = np.exp(logits[0]) / np.exp(logits[0]).sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(r.token_weight)[0], -np.sort(-p, -1)[:, :2], rtol=1e-5)

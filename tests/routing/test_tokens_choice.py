"""Token-choice routing against a numpy port of the GShard / V-MoE position algorithm.

Reference (Lepikhin et al. 2020 Algorithm 1; Riquelme et al. 2021 §3.1 and vmoe):
  p = softmax(logits); each token's top-k experts and gates p (or p renormalised over
  the k, GShard); the buffer position of an assignment is the cumsum, minus one, of the
  one-hot expert mask flattened choice-major (all top-1 choices in token order, then
  all top-2 ...); an assignment is kept iff its position < C. With batch-prioritised
  routing (BPR) the tokens are first sorted by descending top-1 probability, and the
  permutation is undone afterwards.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from moe_jax import routing
from moe_jax.layers import ENGINES

# Tiny test programs: XLA's optimisation passes cost 3x more compile time than they save.
jit = functools.partial(jax.jit, compiler_options=dict(xla_backend_optimization_level=0,
                                                       xla_cpu_use_fusion_emitters=False))
STATIC = ('k', 'capacity', 'capacity_factor', 'batch_priority', 'renormalize')
tokens_choice = jit(routing.tokens_choice, static_argnames=STATIC)


def np_combine(r):
  """[G, S, E, C] combine weights read off the slot table (the dense view, in numpy)."""
  slot_token, slot_weight = np.asarray(r.slot_token), np.asarray(r.slot_weight)
  g, e, c = slot_token.shape
  combine = np.zeros((g, r.num_tokens + 1, e, c))   # row S collects the empty slots
  gi, ei, ci = np.meshgrid(np.arange(g), np.arange(e), np.arange(c), indexing='ij')
  combine[gi, slot_token, ei, ci] = slot_weight
  return combine[:, :-1]


def ref_tokens_choice(logits, k, capacity, renormalize=False, batch_priority=False):
  """Returns the combine tensor [G, S, E, C] (float64) of the cumsum algorithm."""
  probs = scipy.special.softmax(np.asarray(logits, np.float64), axis=-1)
  g, s, e = probs.shape
  combine = np.zeros((g, s, e, capacity))
  for gi in range(g):
    p = probs[gi]
    idx = np.argsort(-p, axis=-1, kind='stable')[:, :k]        # [S, K]
    gates = np.take_along_axis(p, idx, axis=-1)
    if renormalize:
      gates = gates / gates.sum(-1, keepdims=True)
    # BPR: priority = the top-1 router probability (V-MoE), highest first.
    perm = np.argsort(-p.max(-1), kind='stable') if batch_priority else np.arange(s)
    mask = np.concatenate([np.eye(e)[idx[perm, r]] for r in range(k)])   # [K*S, E]
    position = ((np.cumsum(mask, axis=0) - 1) * mask).sum(-1).reshape(k, s).T
    for i, tok in enumerate(perm):
      for r in range(k):
        if position[i, r] < capacity:
          combine[gi, tok, idx[tok, r], int(position[i, r])] = gates[tok, r]
  return combine


def random_logits(seed, shape, scale=2.0):
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


@pytest.mark.parametrize('k, capacity, renormalize, batch_priority', [
    (1, 2, False, False),
    (2, 3, False, False),
    (2, 3, True, False),
    (2, 2, False, True),
    (1, 2, True, True),     # k=1 renormalised weights are all 1: BPR must still use p
    (2, 2, True, True),     # BPR by p1, not by the renormalised p1 / (p1 + p2)
])
def test_matches_cumsum_reference(k, capacity, renormalize, batch_priority):
  logits = random_logits(k + capacity, (2, 12, 4))
  combine = np_combine(tokens_choice(logits, k=k, capacity=capacity, renormalize=renormalize,
                                     batch_priority=batch_priority))
  expected = ref_tokens_choice(logits, k, capacity, renormalize, batch_priority)
  assert combine.shape == expected.shape
  np.testing.assert_array_equal(combine > 0, expected > 0)
  np.testing.assert_allclose(combine, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('k, num_experts, capacity', [(1, 4, 2), (2, 4, 3), (2, 8, 1)])
def test_capacity_property_over_many_groups(k, num_experts, capacity):
  """64 random groups: each expert keeps exactly min(C, demand) assignments, every slot
  holds at most one token, a token takes an expert at most once, and the slot table
  and the token-side view describe the same assignments."""
  g, s = 64, 10
  logits = random_logits(7 * k + num_experts, (g, s, num_experts), scale=1.5)
  # Skew some groups hard towards expert 0 so overflow is common.
  logits[::2, :, 0] += 3.0
  r = tokens_choice(logits, k=k, capacity=capacity)
  slot_token, slot_weight = np.asarray(r.slot_token), np.asarray(r.slot_weight)
  token_slot, token_expert = np.asarray(r.token_slot), np.asarray(r.token_expert)
  token_weight = np.asarray(r.token_weight)
  assert slot_token.shape == (g, num_experts, capacity)
  demand = np.stack([np.bincount(token_expert[i].ravel(), minlength=num_experts)
                     for i in range(g)])
  filled = (slot_token < s).sum(-1)
  np.testing.assert_array_equal(filled, np.minimum(demand, capacity))
  # Filled slots are packed at the front of each expert's buffer.
  np.testing.assert_array_equal(slot_token < s, np.arange(capacity) < filled[..., None])
  assert np.all(slot_weight[slot_token == s] == 0)
  for i in range(g):
    kept = token_slot[i] < num_experts * capacity
    flat = token_slot[i][kept]
    assert len(np.unique(flat)) == len(flat)           # no slot used twice
    toks = np.nonzero(kept)[0]
    np.testing.assert_array_equal(slot_token[i].ravel()[flat], toks)
    np.testing.assert_array_equal(flat // capacity, token_expert[i][kept])
    np.testing.assert_allclose(slot_weight[i].ravel()[flat], token_weight[i][kept])
    assert int(kept.sum()) == int((slot_token[i] < s).sum())
    for tok in range(s):                               # k distinct experts per token
      assert len(set(token_expert[i, tok])) == k


def test_top1_choices_take_slots_before_any_top2():
  """Hand-built: token 0 ranks expert 1 second; tokens 1, 2 rank it first. With C=2 the
  two first choices win and token 0's second choice is dropped, although token 0 comes
  first in the group."""
  logits = np.log(np.array([[[0.6, 0.3, 0.1],
                             [0.2, 0.7, 0.1],
                             [0.1, 0.8, 0.1]]], np.float32))
  r = tokens_choice(logits, k=2, capacity=2)
  np.testing.assert_array_equal(np.asarray(r.slot_token)[0, 1], [1, 2])
  np.testing.assert_array_equal(np.asarray(r.token_slot)[0, 0], [0 * 2 + 0, 3 * 2])   # [kept e0c0, dropped]


def test_batch_priority_order_hand_built():
  """BPR: with C=1 the token with the highest top-1 probability (token 1, not the
  first token) gets expert 0's slot; the others are dropped."""
  logits = np.log(np.array([[[0.6, 0.4], [0.9, 0.1], [0.7, 0.3]]], np.float32))
  bpr = tokens_choice(logits, k=1, capacity=1, batch_priority=True)
  np.testing.assert_array_equal(np.asarray(bpr.slot_token)[0], [[1], [3]])
  np.testing.assert_array_equal(np.asarray(bpr.token_slot)[0, :, 0], [2, 0, 2])


def test_dropped_assignments_have_zero_weight_and_zero_output():
  """All 6 tokens want expert 0 first and expert 1 second; C=2 keeps tokens 0, 1 on
  expert 0 and tokens 0, 1 on expert 1 (top-1 choices take no slot of expert 1).
  Tokens 2..5 are dropped entirely: weight 0 everywhere and MoE output exactly 0."""
  logits = np.tile(np.array([3.0, 2.0, 0.0, -1.0], np.float32), (1, 6, 1))
  r = tokens_choice(logits, k=2, capacity=2)
  combine = np_combine(r)
  assert np.all(combine[0, 2:] == 0)
  assert np.all(np.asarray(r.token_slot)[0, 2:] == 4 * 2)
  np.testing.assert_allclose(r.metrics['dropped_fraction'], 8 / 12)
  np.testing.assert_allclose(r.metrics['unrouted_fraction'], 4 / 6)
  x = np.random.default_rng(0).normal(size=(1, 6, 5)).astype(np.float32)
  # An expert function with a bias: empty or dropped slots still produce non-zero rows.
  expert_fn = lambda buf: jnp.tanh(buf) + 1.0
  for name in ('einsum', 'gather'):   # the capacity engines (dropless ignores capacity)
    engine = ENGINES[name]()
    y = np.asarray(jit(lambda x, r: engine.apply(x, r, expert_fn))(x, r))
    assert np.all(y[0, 2:] == 0.0), name
    assert np.all(np.abs(y[0, :2]) > 0), name


def test_renormalized_weights_sum_to_one():
  logits = random_logits(0, (2, 12, 4))      # the shapes and options compiled above
  r = tokens_choice(logits, k=2, capacity=3, renormalize=True, batch_priority=False)
  np.testing.assert_allclose(np.asarray(r.token_weight).sum(-1), 1.0, rtol=1e-6)
  raw = tokens_choice(logits, k=2, capacity=3, renormalize=False, batch_priority=False)
  probs = scipy.special.softmax(logits.astype(np.float64), -1)
  np.testing.assert_allclose(raw.token_weight, -np.sort(-probs, -1)[..., :2], rtol=1e-5)


def test_capacity_factor_convention():
  """The capacity is a static shape: eval_shape reads it without compiling."""
  logits = jax.ShapeDtypeStruct((1, 8, 4), jnp.float32)
  cap = lambda **kw: jax.eval_shape(functools.partial(routing.tokens_choice, **kw), logits).capacity
  assert cap(k=1, capacity_factor=1.25) == 3        # ceil(1 * 8 * 1.25 / 4) = ceil(2.5)
  assert cap(k=2, capacity_factor=1.25) == 5        # ceil(5.0)
  assert cap(k=2, capacity_factor=1.25, capacity_include_k=False, capacity_rounding='round',
             min_capacity=4) == 4                    # flaxformer: max(round(2.5), 4)
  assert cap(k=2, capacity_factor=1.0, capacity_multiple_of=4) == 4   # vmoe: 4 -> 4
  assert cap(k=1, capacity_factor=1.0, capacity=7) == 7               # explicit C wins


def test_bad_k_raises():
  with pytest.raises(ValueError, match='k=5 must be between 1 and the number of experts'):
    routing.tokens_choice(np.zeros((1, 4, 4), np.float32), k=5)


def ref_token_major(logits, k, capacity):
  """The cumsum algorithm with the one-hot mask flattened token-major (token s's k choices,
  then token s + 1's): the causal slot order. Returns [G, S, E, C] float64."""
  probs = scipy.special.softmax(np.asarray(logits, np.float64), axis=-1)
  g, s, e = probs.shape
  combine = np.zeros((g, s, e, capacity))
  for gi in range(g):
    idx = np.argsort(-probs[gi], axis=-1, kind='stable')[:, :k]
    mask = np.eye(e)[idx.reshape(-1)]                               # [S*K, E], token-major
    position = ((np.cumsum(mask, axis=0) - 1) * mask).sum(-1).reshape(s, k)
    for tok in range(s):
      for r in range(k):
        if position[tok, r] < capacity:
          combine[gi, tok, idx[tok, r], int(position[tok, r])] = probs[gi, tok, idx[tok, r]]
  return combine


def test_token_slot_order_matches_the_token_major_reference_and_is_causal():
  logits = np.random.default_rng(3).normal(size=(2, 12, 4)).astype(np.float32)
  fn = jit(routing.tokens_choice, static_argnames=STATIC + ('slot_order',))
  r = fn(logits, k=2, capacity=3, capacity_factor=None, slot_order='token')
  np.testing.assert_allclose(np_combine(r), ref_token_major(logits, 2, 3), rtol=1e-6)
  # Drops of token t depend on tokens <= t only: changing later tokens keeps them.
  changed = logits.copy()
  changed[:, 7:] = np.random.default_rng(4).normal(size=changed[:, 7:].shape)
  r2 = fn(changed, k=2, capacity=3, capacity_factor=None, slot_order='token')
  np.testing.assert_array_equal(np.asarray(r.token_slot)[:, :7], np.asarray(r2.token_slot)[:, :7])
  # The choice-major order does not have that property on this input.
  c1 = fn(logits, k=2, capacity=3, capacity_factor=None, slot_order='choice')
  c2 = fn(changed, k=2, capacity=3, capacity_factor=None, slot_order='choice')
  assert not np.array_equal(np.asarray(c1.token_slot)[:, :7], np.asarray(c2.token_slot)[:, :7])

"""Causal Soft MoE: slot layout and weights against a numpy reference of the design, and
causality of the whole MoE layer (outputs at t ignore inputs after t)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.layers import MoeLayer
from moe_jax.routing.soft_causal import causal_slot_layout, soft_moe_causal
from tests.layers._rbg import rngs

D, E, H = 8, 4, 16     # shared with the other layer tests (one initialisation per shape)


def np_layout(num_tokens, num_experts, r):
  """Instance j = t·r + i opens at position t, belongs to expert j mod E, index j div E."""
  capacity = -(-num_tokens * r // num_experts)
  pos = np.full((num_experts, capacity), -1)
  for t in range(num_tokens):
    for i in range(r):
      j = t * r + i
      pos[j % num_experts, j // num_experts] = t
  return pos, pos >= 0


def np_soft_moe_causal(logits, r):
  """logits: [G, S, E, P] -> dispatch, combine [G, S, E, C] by explicit loops."""
  g, s, e, p = logits.shape
  pos, valid = np_layout(s, e, r)
  c = pos.shape[1]
  dispatch, combine = np.zeros((g, s, e, c)), np.zeros((g, s, e, c))
  for b in range(g):
    for n in range(e):
      for k in range(c):
        if valid[n, k]:
          col = np.exp(logits[b, :pos[n, k] + 1, n, k % p])
          dispatch[b, :pos[n, k] + 1, n, k] = col / col.sum()
    for t in range(s):
      seen = [(n, k) for n in range(e) for k in range(c) if valid[n, k] and pos[n, k] <= t]
      row = np.exp([logits[b, t, n, k % p] for n, k in seen])
      w = row / row.sum()
      for (n, k), v in zip(seen, w):
        combine[b, t, n, k] = v
  return dispatch, combine


@pytest.mark.parametrize('s,e,r', [(5, 3, 1), (5, 3, 2), (8, 4, 1), (3, 4, 3)])
def test_slot_layout(s, e, r):
  pos, valid, capacity = causal_slot_layout(s, e, r)
  ref_pos, ref_valid = np_layout(s, e, r)
  assert capacity == ref_pos.shape[1]
  np.testing.assert_array_equal(valid, ref_valid)
  np.testing.assert_array_equal(np.where(ref_valid, pos, -1), ref_pos)


def test_weights_match_numpy_and_are_causal_by_construction():
  logits = np.random.default_rng(0).normal(size=(2, 7, 3, 2)).astype(np.float32) * 2
  r = jax.jit(lambda lg: soft_moe_causal(lg, slots_per_position=2))(jnp.array(logits))
  dispatch, combine = r.dense()
  d_ref, c_ref = np_soft_moe_causal(logits, 2)
  np.testing.assert_allclose(dispatch, d_ref, atol=1e-6)
  np.testing.assert_allclose(combine, c_ref, atol=1e-6)
  np.testing.assert_allclose(np.asarray(combine).sum(axis=(2, 3)), 1.0, atol=1e-6)
  assert float(r.metrics['slots_per_token']) == 2.0


@pytest.mark.parametrize('length,router_kwargs', [
    (5, dict()), (12, dict(num_slots=2, slots_per_position=2, normalize=False))])
def test_layer_output_at_t_ignores_inputs_after_t(length, router_kwargs):
  layer = MoeLayer(D, E, H, router='soft_moe_causal', router_kwargs=router_kwargs,
                   engine='einsum', rngs=rngs(0))
  layer.eval()
  rng = np.random.default_rng(length)
  base = rng.normal(size=(1, length, D))
  cuts = sorted(rng.choice(length - 1, size=3, replace=False))
  batch = [base]
  for t in cuts:     # each example: the same prefix up to t, new random inputs after t
    x = base.copy()
    x[0, t + 1:] = rng.normal(size=(length - t - 1, D)) * 3
    batch.append(x)
  y, _ = nnx.jit(lambda l, x: l(x))(layer, jnp.array(np.concatenate(batch), jnp.float32))
  y = np.asarray(y)
  for i, t in enumerate(cuts, start=1):
    np.testing.assert_allclose(y[i, :t + 1], y[0, :t + 1], atol=1e-6)
    assert np.abs(y[i, t + 1:] - y[0, t + 1:]).max() > 1e-3    # the future still matters there


def test_plain_soft_moe_is_not_causal():
  """The same check must fail for Soft MoE: the test above can detect leaks."""
  layer = MoeLayer(D, E, H, router='soft_moe', engine='einsum', rngs=rngs(0))
  x = np.random.default_rng(1).normal(size=(2, 6, D))
  x[1, 3:] += 3.0
  y, _ = nnx.jit(lambda l, x: l(x))(layer, jnp.array(x, jnp.float32))
  assert np.abs(np.asarray(y)[1, :3] - np.asarray(y)[0, :3]).max() > 1e-4
  assert not layer.router.is_causal and layer.is_causal is False

"""`Routing`: the dense view of a slot table, shape properties, and pytree behaviour."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import routing
from moe_jax.routing import Routing

jit = functools.partial(jax.jit, compiler_options=dict(xla_backend_optimization_level=0,
                                                       xla_cpu_use_fusion_emitters=False))


def random_slot_table(rng, g, s, e, c):
  """A valid slot table: distinct tokens per expert, some slots empty (token S)."""
  slot_token = np.full((g, e, c), s, np.int32)
  slot_weight = np.zeros((g, e, c), np.float32)
  for gi in range(g):
    for ei in range(e):
      n = rng.integers(0, c + 1)
      slot_token[gi, ei, :n] = rng.choice(s, size=n, replace=False)
      slot_weight[gi, ei, :n] = rng.uniform(0.1, 1.0, size=n)
  return slot_token, slot_weight


def test_dense_view_of_a_slot_table():
  g, s, e, c = 2, 6, 3, 4
  slot_token, slot_weight = random_slot_table(np.random.default_rng(0), g, s, e, c)
  r = Routing(num_tokens=s, slot_token=jnp.asarray(slot_token), slot_weight=jnp.asarray(slot_weight))
  assert (r.is_sparse, r.num_groups, r.num_experts, r.capacity) == (True, g, e, c)
  dispatch, combine = jit(lambda r: r.dense())(r)
  expected_d = np.zeros((g, s, e, c))
  expected_c = np.zeros((g, s, e, c))
  for gi in range(g):
    for ei in range(e):
      for ci in range(c):
        tok = slot_token[gi, ei, ci]
        if tok < s:
          expected_d[gi, tok, ei, ci] = 1.0
          expected_c[gi, tok, ei, ci] = slot_weight[gi, ei, ci]
  assert dispatch.dtype == combine.dtype == jnp.float32
  np.testing.assert_array_equal(dispatch, expected_d)
  np.testing.assert_allclose(combine, expected_c, rtol=1e-7)


def test_dense_view_matches_token_side_view():
  """For token choice, dense() built from the slot table agrees with token_slot /
  token_weight: combine[g, s, e, c] = token_weight where token_slot = e*C + c."""
  logits = np.random.default_rng(1).normal(size=(2, 8, 4)).astype(np.float32)
  r, (dispatch, combine) = jit(lambda l: (lambda r: (r, r.dense()))(
      routing.tokens_choice(l, k=2, capacity=3)))(logits)
  token_slot, token_weight = np.asarray(r.token_slot), np.asarray(r.token_weight)
  g, s, k = token_slot.shape
  e, c = r.num_experts, r.capacity
  expected = np.zeros((g, s, e * c + 1))
  for gi in range(g):
    for si in range(s):
      for ki in range(k):
        expected[gi, si, token_slot[gi, si, ki]] += token_weight[gi, si, ki]
  np.testing.assert_allclose(np.asarray(combine).reshape(g, s, e * c), expected[..., :-1],
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(dispatch).reshape(g, s, e * c), expected[..., :-1] > 0)


def test_dense_form_and_pytree():
  d = jnp.asarray(np.random.default_rng(2).uniform(size=(1, 5, 3, 2)).astype(np.float32))
  r = Routing(num_tokens=5, dispatch_weights=d, combine_weights=2 * d, metrics=dict(a=d.sum()))
  assert (r.is_sparse, r.num_groups, r.num_experts, r.capacity) == (False, 1, 3, 2)
  dispatch, combine = r.dense()
  assert dispatch is d
  # A pytree whose num_tokens is static: it goes through jit unchanged.
  out = jit(lambda r: r.replace(combine_weights=r.combine_weights + 1))(r)
  assert out.num_tokens == 5 and out.slot_token is None
  np.testing.assert_allclose(out.combine_weights, 2 * d + 1)
  assert [x.shape for x in jax.tree.leaves(r)] == [(1, 5, 3, 2), (1, 5, 3, 2), ()]

"""Expert choice (Zhou et al. 2022) against numpy: S = softmax over experts per token;
each expert takes the C tokens with the highest S[:, e] (numpy argsort); the combine
weight of a slot is that score; C = ceil(S·c/E)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from moe_jax import routing

jit = functools.partial(jax.jit, compiler_options=dict(xla_backend_optimization_level=0,
                                                       xla_cpu_use_fusion_emitters=False))


@functools.partial(jit, static_argnames=('capacity_factor',))
def ec(logits, capacity_factor):
  r = routing.experts_choice(logits, capacity_factor=capacity_factor)
  return r, r.dense()


def test_each_expert_takes_its_top_c_tokens():
  g, s, e = 2, 10, 4
  logits = (2 * np.random.default_rng(0).normal(size=(g, s, e))).astype(np.float32)
  r, (dispatch, combine) = ec(logits, 2.0)
  c = 5                                         # ceil(10 * 2 / 4)
  assert r.capacity == c
  probs = scipy.special.softmax(logits.astype(np.float64), axis=-1)
  slot_token, combine, dispatch = map(np.asarray, (r.slot_token, combine, dispatch))
  for gi in range(g):
    for ei in range(e):
      top = np.argsort(-probs[gi, :, ei], kind='stable')[:c]
      assert set(slot_token[gi, ei].tolist()) == set(top.tolist())
      expected = np.zeros(s)
      expected[top] = probs[gi, top, ei]
      np.testing.assert_allclose(combine[gi, :, ei].sum(-1), expected, rtol=1e-5)
      np.testing.assert_array_equal(dispatch[gi, :, ei].sum(-1), expected > 0)
  # Slot weights are the softmax scores of the chosen tokens.
  np.testing.assert_allclose(
      r.slot_weight, np.take_along_axis(probs.transpose(0, 2, 1), slot_token, -1),
      rtol=1e-5)
  assert r.aux_losses == {}
  # Every slot is filled: nothing dropped; unrouted = tokens no expert picked.
  picked = np.zeros((g, s), bool)
  for gi in range(g):
    picked[gi, slot_token[gi].ravel()] = True
  np.testing.assert_allclose(r.metrics['unrouted_fraction'], 1 - picked.mean(), rtol=1e-6)
  assert float(r.metrics['dropped_fraction']) == 0.0
  np.testing.assert_allclose(r.metrics['expert_load'], np.full(e, 1 / e), rtol=1e-6)


def test_capacity_formula():
  shape = jax.ShapeDtypeStruct((1, 10, 4), jnp.float32)
  cap = lambda **kw: jax.eval_shape(functools.partial(routing.experts_choice, **kw), shape).capacity
  assert cap() == 5                              # default c = 2: ceil(10 * 2 / 4)
  assert cap(capacity_factor=1.0) == 3           # ceil(2.5)
  assert cap(capacity_factor=1.0, capacity_rounding='round', capacity_multiple_of=1) == 2
  assert cap(capacity_factor=1.0, capacity_multiple_of=4) == 4
  assert cap(capacity=7) == 7
  assert cap(capacity_factor=100.0) == 10        # clipped to the S tokens of a group


def test_z_loss_option():
  logits = np.random.default_rng(1).normal(size=(1, 6, 3)).astype(np.float32)
  r = jit(lambda l: routing.experts_choice(l, capacity_factor=1.0, z_loss_weight=1e-3))(logits)
  expected = np.mean(scipy.special.logsumexp(logits.astype(np.float64), -1) ** 2)
  np.testing.assert_allclose(r.aux_losses['router_z'], 1e-3 * expected, rtol=1e-5)

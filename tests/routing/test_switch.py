"""Switch top-1 against a numpy reference of Fedus et al. 2021 (eqs. 1-2 and 4-6), the
straight-through gate against its analytic gradient, and the input jitter's range."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.routing.switch import multiplicative_jitter, switch_top1

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


def softmax(v):
  z = np.exp(v - v.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def reference(logits, capacity, alpha=1e-2):
  """One group: combine [S, E] (raw p at kept argmax, token order) and α·E·Σ f·P."""
  s, e = logits.shape
  p = softmax(logits)
  choice = p.argmax(-1)
  combine, used = np.zeros((s, e)), np.zeros(e, int)
  for t in range(s):
    if used[choice[t]] < capacity:
      combine[t, choice[t]] = p[t, choice[t]]
    used[choice[t]] += 1
  f = np.bincount(choice, minlength=e) / s
  return combine, alpha * e * np.sum(f * p.mean(0))


def test_matches_reference_with_drops():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 16, 4)).astype(np.float32)
  logits[1, :, 2] += 2.0                      # overloads expert 2 in group 1
  r = run(switch_top1, logits)
  assert r.capacity == 5                      # ceil(16 * 1.25 / 4)
  combine = combine_of(r)
  auxes = []
  for g in range(2):
    ref, aux = reference(logits[g].astype(np.float64), 5)
    np.testing.assert_allclose(combine[g], ref, atol=1e-6)
    auxes.append(aux)
  np.testing.assert_allclose(float(r.aux_losses['load_balancing']), np.mean(auxes), rtol=1e-5)
  assert float(r.metrics['dropped_fraction']) > 0


def test_loss_is_alpha_at_uniform_and_alpha_e_when_collapsed():
  e, s = 4, 8
  logits = np.zeros((2, s, e), np.float32)
  # Group 0: uniform probabilities, argmax spread evenly (tiny tie-breaking offsets).
  logits[0, np.arange(s), np.arange(s) % e] = 1e-6
  logits[1, :, 0] = 50.0                      # group 1: every token on expert 0 with p = 1
  per_group = lambda z: switch_top1(z[None]).aux_losses['load_balancing']
  loss = jax.jit(jax.vmap(per_group))
  np.testing.assert_allclose(np.asarray(loss(logits)), [1e-2, 1e-2 * e], rtol=1e-4)


def test_straight_through_forward_is_hard_backward_is_soft():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 8, 4)).astype(np.float32)
  values = rng.normal(size=(2, 8, 4)).astype(np.float32)   # stands in for <dL/dy, E_e(x)>
  def task(z, st):
    _, combine = switch_top1(z, straight_through=st, capacity=8, load_balance_weight=0.0).dense()
    return jnp.sum(combine.sum(-1) * values)
  @jax.jit
  def outputs(z):
    _, combine = switch_top1(z, straight_through=True, capacity=8).dense()
    return combine.sum(-1), jax.grad(task)(z, True), jax.grad(task)(z, False)
  combine, grad_st, grad_soft = (np.asarray(a) for a in outputs(logits))
  p = softmax(logits.astype(np.float64))
  choice = p.argmax(-1)
  np.testing.assert_array_equal(combine, np.eye(4)[choice])      # forward weight exactly 1
  # Analytic: dL/dz_j = v_{i*} · p_{i*} (δ_{i* j} − p_j) for every token.
  pi = np.take_along_axis(p, choice[..., None], -1)
  vi = np.take_along_axis(values, choice[..., None], -1)
  np.testing.assert_allclose(grad_st, vi * pi * (np.eye(4)[choice] - p), atol=1e-5)
  np.testing.assert_allclose(grad_st, grad_soft, atol=1e-6)      # = gradient of the soft gate


def test_multiplicative_jitter_range_and_mean():
  jitter = jax.jit(multiplicative_jitter, static_argnums=2)
  y = np.asarray(jitter(np.ones((64, 256), np.float32), jax.random.key(0, impl='rbg'), 0.01))
  assert y.min() >= 0.99 and y.max() <= 1.01
  assert abs(y.mean() - 1.0) < 1e-3 and y.std() > 0.004   # U(0.99, 1.01): std 0.0058
  bf16 = jax.eval_shape(lambda x, k: multiplicative_jitter(x, k, 0.01),
                        np.ones((2, 3), jnp.bfloat16), jax.random.key(0, impl='rbg'))
  assert bf16.dtype == jnp.bfloat16
  x = np.ones((2, 3), np.float32)
  assert multiplicative_jitter(x, jax.random.key(0, impl='rbg'), 0.0) is x


@pytest.mark.parametrize('rounding,expected', [('ceil', 6), ('floor', 5), ('round', 6)])
def test_capacity_rounding_options(rounding, expected):
  shape = jax.eval_shape(lambda z: switch_top1(z, capacity_rounding=rounding),
                         np.zeros((1, 18, 4), np.float32))
  assert shape.capacity == expected           # 18 * 1.25 / 4 = 5.625

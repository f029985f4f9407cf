"""Soft MoE end to end against numpy (Puigcerver et al. 2023).

    D = softmax_m(logits)              dispatch, over the tokens m, per slot (eq. 1)
    X~ = Dᵀ X                          slot inputs
    Y~_{n,p} = f_n(X~_{n,p})           expert n on its p slots (eq. 2)
    C = softmax_{(n,p)}(logits)        combine, jointly over all n·p slots, per token
    Y = C Y~                           (eq. 3)
with logits = scale · <x̂_m, Φ̂_{n,p}>, x̂ and Φ̂'s columns l2-normalised (Algorithm 2,
normalisation with eps inside the square root as in vmoe).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import layers, routing

jit = functools.partial(jax.jit, compiler_options=dict(xla_backend_optimization_level=0,
                                                       xla_cpu_use_fusion_emitters=False))
B, S, D, E, H = 2, 8, 16, 4, 32


def np_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return np.exp(x) / np.exp(x).sum(axis=axis, keepdims=True)


def np_soft_moe(x, logits, expert_fn):
  """x: [G, m, d], logits: [G, m, n, p], expert_fn(e, [N, d]) -> [N, d]."""
  g, m, n, p = logits.shape
  y = np.zeros(x.shape)
  for gi in range(g):
    lg = logits[gi].reshape(m, n * p)
    dispatch = np_softmax(lg, axis=0)                    # columns: per slot, over tokens
    combine = np_softmax(lg, axis=1)                     # rows: per token, over all slots
    slots_in = dispatch.T @ x[gi]                        # [n·p, d]
    slots_out = np.concatenate([expert_fn(e, slots_in[e * p:(e + 1) * p]) for e in range(n)])
    y[gi] = combine @ slots_out
  return y


def np_l2_normalize(v, axis, eps=1e-6):
  return v / np.sqrt(np.sum(v * v, axis=axis, keepdims=True) + eps)


def np_gelu(v):
  return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))


def test_engines_match_numpy_given_logits():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, S, D)).astype(np.float32)
  logits = (2 * rng.normal(size=(B, S, E, 2))).astype(np.float32)
  w = rng.normal(size=(E, D, D)).astype(np.float32) / np.sqrt(D)
  expert_fn = lambda buf: jnp.tanh(jnp.einsum('end,edf->enf', buf, w))   # [E, N, d]
  expected = np_soft_moe(x.astype(np.float64), logits.astype(np.float64),
                         lambda e, v: np.tanh(v @ w[e].astype(np.float64)))
  for name, engine_cls in layers.ENGINES.items():
    engine = engine_cls()
    y = jit(lambda x, l: engine.apply(x, routing.soft_moe(l), expert_fn))(x, logits)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5, err_msg=name)


def test_router_logits_normalisation_and_scale():
  router = layers.SoftMoeRouter(D, E, num_slots=2, rngs=nnx.Rngs(0))
  router.scale[...] = jnp.float32(2.5)
  x = (3 * np.random.default_rng(1).normal(size=(B, S, D))).astype(np.float32)
  phi = np.asarray(router.phi[...], np.float64)                      # [d, n, p]
  x_hat = np_l2_normalize(x.astype(np.float64), axis=-1)
  phi_hat = np_l2_normalize(phi, axis=0)
  expected = 2.5 * np.einsum('gsd,dnp->gsnp', x_hat, phi_hat)
  logits = jit(lambda r, x: r.logits(x))(router, x)
  assert logits.dtype == jnp.float32 and logits.shape == (B, S, E, 2)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
  # Normalised: |logit| <= scale, whatever the norm of x.
  assert np.abs(np.asarray(logits)).max() <= 2.5 + 1e-5
  router.normalize = False
  plain = jit(lambda r, x: r.logits(x))(router, x)
  np.testing.assert_allclose(plain, np.einsum('gsd,dnp->gsnp', x, phi), rtol=1e-5, atol=1e-5)


def test_num_slots_from_capacity_factor():
  # vmoe: p = round(cf · m / n) when num_slots is None.
  router = layers.SoftMoeRouter(D, E, num_slots=None, capacity_factor=1.0,
                                context=layers.LayerContext(tokens_per_group=S),
                                rngs=nnx.Rngs(0))
  assert router.num_slots == 2 and router.phi.shape == (D, E, 2)
  with pytest.raises(ValueError, match=r'tokens per group: build it with '
                                       r'context=LayerContext\(tokens_per_group=S\)'):
    layers.SoftMoeRouter(D, E, capacity_factor=1.0, rngs=nnx.Rngs(0))
  # Through the layer: the routing group is `group_size` tokens when that is set.
  layer = nnx.eval_shape(lambda: layers.MoeLayer(
      D, E, 4, router='soft_moe', router_kwargs=dict(capacity_factor=1.0), group_size=2 * S,
      context=layers.LayerContext(tokens_per_group=S), rngs=nnx.Rngs(0)))
  assert layer.router.num_slots == 4 == round(1.0 * 2 * S / E)
  with pytest.raises(ValueError, match='num_slots >= 1'):
    layers.SoftMoeRouter(D, E, num_slots=0, rngs=nnx.Rngs(0))


def test_layer_output_matches_numpy():
  layer = layers.MoeLayer(D, E, H, router='soft_moe', router_kwargs=dict(num_slots=2),
                          rngs=nnx.Rngs(2))
  x = np.random.default_rng(3).normal(size=(B, S, D)).astype(np.float32)
  y, aux = jit(lambda m, x: m(x))(layer, x)
  phi = np.asarray(layer.router.phi[...], np.float64)
  logits = float(layer.router.scale[...]) * np.einsum(
      'gsd,dnp->gsnp', np_l2_normalize(x.astype(np.float64), -1), np_l2_normalize(phi, 0))
  p = {k: np.asarray(v, np.float64) for k, v in layer.experts.params_dict().items()}
  mlp = lambda e, v: np_gelu(v @ p['w_in'][e] + p['b_in'][e]) @ p['w_out'][e] + p['b_out'][e]
  np.testing.assert_allclose(y, np_soft_moe(x.astype(np.float64), logits, mlp),
                             rtol=1e-4, atol=1e-5)
  assert aux['losses'] == {}

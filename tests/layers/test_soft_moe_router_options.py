"""SoftMoeRouter options (slots, capacity factor, normalisation, noise) against numpy
written from the Soft MoE paper (Algorithm 2) and vmoe's SoftRouter."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.layers import LayerContext, MoeLayer, SoftMoeRouter
from tests.layers._rbg import rngs

# One set of parameter shapes for every test (d = 8, E = 4, P = 2, h = 16): parameter
# initialisers compile once per shape, which dominates the run time of small tests.
D, E, P, H = 8, 4, 2, 16


def np_softmax(x, axis):
  x = np.exp(x - x.max(axis=axis, keepdims=True))
  return x / x.sum(axis=axis, keepdims=True)


def np_soft_moe(x, phi, scale, normalize):
  """x: [G, S, d], phi: [d, E, P] -> logits, dispatch, combine, each [G, S, E, P]."""
  x, phi = np.asarray(x, np.float64), np.asarray(phi, np.float64)
  if normalize:
    x = x / np.sqrt((x ** 2).sum(-1, keepdims=True) + 1e-6)
    phi = scale * phi / np.sqrt((phi ** 2).sum(0, keepdims=True) + 1e-6)
  logits = np.einsum('gsd,dep->gsep', x, phi)
  g, s, e, p = logits.shape
  dispatch = np_softmax(logits, axis=1)
  combine = np_softmax(logits.reshape(g, s, e * p), axis=-1).reshape(g, s, e, p)
  return logits, dispatch, combine


def test_slots_normalisation_and_scale_match_numpy():
  x = jnp.array(np.random.default_rng(0).normal(size=(2, 6, D)) * 3.0, jnp.float32)
  routers = [SoftMoeRouter(D, E, num_slots=P, normalize=n, rngs=rngs(1)) for n in (True, False)]
  for router in routers:
    router.scale[...] = jnp.float32(1.7)
  (d1, c1), (d2, c2) = nnx.jit(lambda rs, x: [r(x).dense() for r in rs])(routers, x)
  for router, (dispatch, combine) in zip(routers, [(d1, c1), (d2, c2)]):
    assert router.phi.shape == (D, E, P)
    _, d_ref, c_ref = np_soft_moe(x, router.phi[...], 1.7, router.normalize)
    np.testing.assert_allclose(dispatch, d_ref, atol=1e-5)
    np.testing.assert_allclose(combine, c_ref, atol=1e-5)
  assert not np.allclose(d1, d2, atol=1e-3)          # normalisation changes the routing


@pytest.mark.parametrize('cf,tokens,experts,slots', [
    (1.0, 16, 4, 4), (0.5, 10, 4, 1), (1.0, 196, 128, 2), (2.0, 196, 128, 3), (1.0, 20, 8, 2)])
def test_slots_from_capacity_factor_round_like_vmoe(cf, tokens, experts, slots):
  # eval_shape: only the sizes matter, so build the module abstractly (no initialisation).
  router = nnx.eval_shape(lambda: SoftMoeRouter(
      4, experts, capacity_factor=cf, context=LayerContext(tokens_per_group=tokens),
      rngs=nnx.Rngs(0)))
  assert router.num_slots == slots == int(round(cf * tokens / experts))
  assert router.phi.shape == (4, experts, slots)


def test_capacity_factor_errors_are_clear():
  with pytest.raises(ValueError, match='tokens_per_group'):
    SoftMoeRouter(4, 4, capacity_factor=1.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='0 slots'):
    SoftMoeRouter(4, 4, capacity_factor=0.1, context=LayerContext(tokens_per_group=8),
                  rngs=nnx.Rngs(0))


def test_logit_noise_only_in_training():
  x = jnp.array(np.random.default_rng(2).normal(size=(2, 32, D)), jnp.float32)
  router = SoftMoeRouter(D, E, num_slots=P, noise_std=0.5, rngs=rngs(0, gating=3))
  evaluating = nnx.clone(router)
  evaluating.eval()
  train_a, train_b, eval_a = nnx.jit(lambda r, q, x: (r.logits(x), r.logits(x), q.logits(x)))(
      router, evaluating, x)
  clean, _, _ = np_soft_moe(x, router.phi[...], 1.0, True)
  np.testing.assert_allclose(eval_a, clean, atol=1e-5)
  for noisy in (train_a, train_b):
    z = (np.asarray(noisy) - clean) / 0.5                        # should be N(0, 1)
    assert abs(z.mean()) < 0.1 and 0.9 < z.std() < 1.1
  assert not np.allclose(train_a, train_b)                       # fresh noise every call


def test_soft_moe_layer_output_matches_numpy():
  """y = C · f(Dᵀ X) with relu expert MLPs."""
  x = jnp.array(np.random.default_rng(3).normal(size=(2, 6, D)), jnp.float32)
  layer = MoeLayer(D, E, H, router='soft_moe', router_kwargs=dict(num_slots=P), engine='einsum',
                   activation='relu', rngs=rngs(4))
  y, _ = nnx.jit(lambda l, x: l(x))(layer, x)
  _, dispatch, combine = np_soft_moe(x, layer.router.phi[...], 1.0, True)
  p = {n: np.asarray(v, np.float64) for n, v in layer.experts.params_dict().items()}
  slots = np.einsum('gsep,gsd->gepd', dispatch, np.asarray(x, np.float64))
  h = np.maximum(np.einsum('gepd,edh->geph', slots, p['w_in']) + p['b_in'][None, :, None], 0)
  out = np.einsum('geph,ehd->gepd', h, p['w_out']) + p['b_out'][None, :, None]
  np.testing.assert_allclose(y, np.einsum('gsep,gepd->gsd', combine, out), atol=1e-5)

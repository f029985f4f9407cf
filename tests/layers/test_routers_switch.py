"""'switch' and 'straight_through' modules: capacity 1.25 / 2.0, jitter only in training,
and the straight-through gradient through a whole MoeLayer against a numpy derivation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import layers
from moe_jax.layers.routers.switch import StraightThroughRouter, SwitchRouter


def rngs():
  # 'rbg' keys: random bits compile far faster on CPU than the default threefry.
  return nnx.Rngs(jax.random.key(0, impl='rbg'))


def test_capacity_train_eval_and_jitter_only_in_training():
  router = SwitchRouter(8, 4, rngs=rngs())
  assert router.jitter_eps == 1e-2 and StraightThroughRouter(8, 4, rngs=rngs()).jitter_eps == 0
  x = np.ones((2, 16, 8), np.float32)
  router.eval()
  count = int(router.rngs.count[...])
  assert jax.eval_shape(router, x).capacity == 8           # 16 * 2.0 / 4
  assert int(router.rngs.count[...]) == count              # evaluation draws no jitter
  no_jitter = SwitchRouter(8, 4, rngs=rngs(), jitter_eps=0.0)
  assert jax.eval_shape(no_jitter, x).capacity == 5        # ceil(16 * 1.25 / 4)
  with pytest.raises(ValueError, match='jitter_eps'):
    SwitchRouter(8, 4, rngs=rngs(), jitter_eps=1.5)


def test_straight_through_layer_gradient_matches_numpy():
  """L = Σ c · y. Forward: y_t = E_{i*}(x_t) (weight 1). Router gradient:
  ∂L/∂W = Σ_t x_t ⊗ [<c_t, E_{i*}(x_t)> · p_{i*} (onehot(i*) − p)]  (the soft gate's)."""
  d, e, h = 6, 4, 8
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, d)).astype(np.float32)
  c = rng.normal(size=(2, 8, d)).astype(np.float32)
  layer = layers.MoeLayer(d, e, h, router='straight_through', activation='relu',
                          router_kwargs=dict(capacity_factor=4.0, load_balance_weight=0.0),
                          rngs=rngs())

  @nnx.jit
  def run(layer, x):
    def loss(m):
      y, _ = m(x)
      return jnp.sum(y * c), y
    router_params = nnx.DiffState(0, nnx.All(nnx.Param, nnx.PathContains('router')))
    (_, y), grads = nnx.value_and_grad(loss, argnums=router_params, has_aux=True)(layer)
    return y, grads['router']['gate']['kernel'][...]

  y, grad_w = (np.asarray(a, np.float64) for a in run(layer, x))
  w = np.asarray(layer.router.gate.kernel[...], np.float64)
  ex = {n: np.asarray(getattr(layer.experts, n)[...], np.float64)
        for n in ('w_in', 'b_in', 'w_out', 'b_out')}
  xs = x.reshape(-1, d).astype(np.float64)
  logits = xs @ w
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  choice = p.argmax(-1)
  def mlp(v, i):
    return np.maximum(v @ ex['w_in'][i] + ex['b_in'][i], 0) @ ex['w_out'][i] + ex['b_out'][i]
  out = np.stack([mlp(xs[t], i) for t, i in enumerate(choice)])
  np.testing.assert_allclose(y.reshape(-1, d), out, atol=1e-4)           # hard forward
  dl_dw = (c.reshape(-1, d) * out).sum(-1)                              # <c_t, E_{i*}(x_t)>
  pi = p[np.arange(len(choice)), choice]
  dz = (dl_dw * pi)[:, None] * (np.eye(e)[choice] - p)
  np.testing.assert_allclose(grad_w, xs.T @ dz, rtol=1e-4, atol=1e-5)
  assert np.abs(grad_w).sum() > 0

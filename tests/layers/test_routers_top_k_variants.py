"""The top-k variants (noisy top-k, GShard top-2, Switch, straight-through, DeepSeek)
inside `MoeLayer`: nnx.jit, train and eval, einsum and gather engines (same numbers), bf16
activations, gradients into the router parameters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import layers
from moe_jax.errors import ConfigError


D, E, H = 8, 4, 16
CASES = {
    'noisy_top_k': dict(k=2),
    'gshard_top2': dict(),
    'switch': dict(),
    'straight_through': dict(),
    'deepseek': dict(k=2, n_groups=2, topk_groups=1),
}
# Routers whose gradient into the router is checked elsewhere (compile time is the cost
# of these tests): noisy_top_k and switch in tests/routing, straight_through and deepseek
# (an optimizer step) in their own tests/layers files.
GRADIENT_CHECKED_HERE = ('gshard_top2',)


def rngs():
  # 'rbg' keys: random bits compile far faster on CPU than the default threefry.
  return nnx.Rngs(jax.random.key(0, impl='rbg'))


def make(router, engine, **extra):
  return layers.MoeLayer(D, E, H, router=router, router_kwargs=CASES[router], engine=engine,
                         rngs=rngs(), **extra)


def loss_fn(layer, x):
  y, aux = layer(x)
  return jnp.sum(jnp.sin(y)) + sum(aux['losses'].values()), (y, aux)


def evaluate_both_engines(eval_layer, x):
  """bf16 evaluation: the router's output through both engines (MoeLayer's path)."""
  xb = x.astype(jnp.bfloat16)
  r = eval_layer.router(xb)
  return tuple(layers.get_engine(name).apply(xb, r, eval_layer.experts)
               for name in ('einsum', 'gather'))


@nnx.jit
def with_gradient(train_layer, eval_layer, x):
  """Training: MoeLayer (gather engine) forward + router gradient; then evaluation."""
  router_params = nnx.DiffState(0, nnx.All(nnx.Param, nnx.PathContains('router')))
  (_, (y, aux)), grads = nnx.value_and_grad(loss_fn, argnums=router_params,
                                            has_aux=True)(train_layer, x)
  return (y, aux, grads) + evaluate_both_engines(eval_layer, x)


@nnx.jit
def without_gradient(train_layer, eval_layer, x):
  y, aux = train_layer(x)
  return (y, aux, None) + evaluate_both_engines(eval_layer, x)


def test_registry_and_flags():
  for name in CASES:
    assert name in layers.ROUTERS
    assert layers.ROUTERS[name].causal                 # every one of them is causal
  with pytest.raises(ConfigError, match="takes no argument 'capacity_factr'. Did you mean "
                     "'capacity_factor'"):
    layers.MoeLayer(D, E, H, router='switch', router_kwargs=dict(capacity_factr=2.0),
                    rngs=rngs())


@pytest.mark.parametrize('router', sorted(CASES))
def test_jit_train_eval_engines_bf16(router):
  x = np.random.default_rng(0).normal(size=(2, 8, D)).astype(np.float32)
  train_layer, eval_layer = make(router, 'gather'), make(router, 'einsum')
  eval_layer.eval()
  fn = with_gradient if router in GRADIENT_CHECKED_HERE else without_gradient
  y, aux, grads, y_einsum, y_gather = fn(train_layer, eval_layer, x)
  assert y.dtype == jnp.float32 and np.abs(np.asarray(y)).sum() > 0
  assert aux['losses'] and all(np.isfinite(float(v)) for v in aux['losses'].values())
  if grads is not None:
    total = sum(float(np.abs(np.asarray(g)).sum()) for g in jax.tree.leaves(grads['router']))
    assert total > 0, f'{router}: no gradient reaches the router'
  assert y_einsum.dtype == y_gather.dtype == jnp.bfloat16
  y_einsum, y_gather = np.asarray(y_einsum, np.float32), np.asarray(y_gather, np.float32)
  np.testing.assert_allclose(y_einsum, y_gather, atol=3e-2)
  assert np.all(np.isfinite(y_einsum)) and np.abs(y_einsum).sum() > 0

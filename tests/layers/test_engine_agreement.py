"""Every engine gives the same layer: outputs and gradients (w.r.t. x, router params and
expert params) agree to 1e-5 in float32, for token choice (k=1 and k=2, with tokens
dropped by capacity), expert choice and Soft MoE."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import layers

jit = functools.partial(jax.jit, compiler_options=dict(xla_backend_optimization_level=0,
                                                       xla_cpu_use_fusion_emitters=False))
B, S, D, E, H = 2, 8, 16, 4, 32

CONFIGS = {
    'top1_drops': ('tokens_choice', dict(k=1, capacity_factor=0.5)),
    'top2_drops': ('tokens_choice', dict(k=2, capacity_factor=0.5, z_loss_weight=1e-3)),
    'experts_choice': ('experts_choice', dict(capacity_factor=1.0)),
    'soft_moe': ('soft_moe', dict(num_slots=2)),
}


def loss_fn(layer, x, target):
  y, aux = layer(x)
  return jnp.sum(y * target) + sum(aux['losses'].values()), (y, aux['metrics'])


@jit
def value_and_grads(layer, x, target):
  return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(layer, x, target)


@pytest.mark.parametrize('config', list(CONFIGS))
def test_engines_agree_on_outputs_and_gradients(config):
  router, kwargs = CONFIGS[config]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, S, D)).astype(np.float32)
  target = rng.normal(size=(B, S, D)).astype(np.float32)
  results = {}
  for engine in layers.ENGINES:
    layer = layers.MoeLayer(D, E, H, router=router, router_kwargs=kwargs, engine=engine,
                            rngs=nnx.Rngs(0))
    (loss, (y, metrics)), (g_layer, g_x) = value_and_grads(layer, x, target)
    results[engine] = dict(loss=loss, y=y, g_x=g_x, params=nnx.state(g_layer, nnx.Param))
  if config.endswith('drops'):
    assert float(metrics['dropped_fraction']) > 0.2   # the comparison covers dropped tokens
  ref = results.pop('einsum')
  for engine, got in results.items():
    np.testing.assert_allclose(got['loss'], ref['loss'], rtol=1e-5, err_msg=engine)
    np.testing.assert_allclose(got['y'], ref['y'], rtol=1e-5, atol=1e-5, err_msg=engine)
    np.testing.assert_allclose(got['g_x'], ref['g_x'], rtol=1e-5, atol=1e-5, err_msg=engine)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref['params']))
    flat_got = dict(jax.tree_util.tree_leaves_with_path(got['params']))
    assert flat_got.keys() == flat_ref.keys()
    for path, g in flat_ref.items():
      np.testing.assert_allclose(flat_got[path], g, rtol=1e-5, atol=1e-5,
                                 err_msg=f'{engine} {jax.tree_util.keystr(path)}')

"""Router modules inside MoeLayer: gradients reach every router parameter, routing stays
float32 with bfloat16 activations, and eval() turns off noise and switches to the
evaluation capacity factor (under nnx.jit; the other tests use jax.jit)."""
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

ROUTER_CONFIGS = [
    ('tokens_choice', dict(k=2, capacity_factor=1.0, z_loss_weight=1e-3, importance_weight=1e-2)),
    ('experts_choice', dict(capacity_factor=1.0)),
    ('soft_moe', dict(num_slots=2)),
]


def make_layer(router, kwargs, **layer_kwargs):
  return layers.MoeLayer(D, E, H, router=router, router_kwargs=kwargs, rngs=nnx.Rngs(0),
                         **layer_kwargs)


def make_x(seed=0, dtype=np.float32):
  return np.random.default_rng(seed).normal(size=(B, S, D)).astype(dtype)


@jit
def grads(layer, x, target):
  def loss(layer):
    y, aux = layer(x)
    return jnp.sum(y * target) + sum(aux['losses'].values())
  return nnx.state(jax.grad(loss)(layer), nnx.Param)


@pytest.mark.parametrize('router, kwargs', ROUTER_CONFIGS)
def test_gradients_reach_every_router_parameter(router, kwargs):
  layer = make_layer(router, kwargs)
  g = grads(layer, make_x(), make_x(1))
  router_grads = jax.tree_util.tree_leaves_with_path(g['router'])
  expected = {'tokens_choice': 1, 'experts_choice': 1, 'soft_moe': 2}[router]  # kernel; phi, scale
  assert len(router_grads) == expected
  for path, leaf in router_grads:
    leaf = np.asarray(leaf)
    assert np.all(np.isfinite(leaf)), jax.tree_util.keystr(path)
    assert np.abs(leaf).max() > 1e-6, f'no gradient reaches {jax.tree_util.keystr(path)}'
  for path, leaf in jax.tree_util.tree_leaves_with_path(g['experts']):
    assert np.all(np.isfinite(leaf)) and np.abs(leaf).max() > 0, jax.tree_util.keystr(path)


def test_bf16_activations_keep_routing_in_float32():
  layer_list = [make_layer(r, kw) for r, kw in ROUTER_CONFIGS]
  # x exactly representable in bf16, so both runs see the same routing inputs.
  x32 = make_x().astype(jnp.bfloat16).astype(np.float32)

  @jit
  def run(layer_list, x32):
    out = []
    x16 = x32.astype(jnp.bfloat16)
    for layer in layer_list:
      y16, aux16 = layer(x16)
      out.append(dict(r16=layer.router(x16), y16=y16, y32=layer(x32)[0], aux16=aux16))
    return out

  for (name, _), out in zip(ROUTER_CONFIGS, run(layer_list, x32)):
    r = out['r16']
    weights = [r.slot_weight] if r.is_sparse else [r.dispatch_weights, r.combine_weights]
    for w in weights:
      assert w.dtype == jnp.float32, name
    for m in jax.tree.leaves(out['aux16']):
      assert m.dtype in (jnp.float32, jnp.int32), name
    assert out['y16'].dtype == jnp.bfloat16, name
    y16, y32 = np.asarray(out['y16'], np.float32), np.asarray(out['y32'])
    np.testing.assert_allclose(y16, y32, atol=0.03 * np.abs(y32).max(), err_msg=name)
  # The gate itself computes float32 logits from bf16 input.
  gate = layer_list[0].router.gate
  assert jax.eval_shape(gate, jax.ShapeDtypeStruct((B, S, D), jnp.bfloat16)).dtype == jnp.float32


def test_eval_turns_off_noise_and_uses_eval_capacity_factor():
  """In training every call draws fresh noise; after eval() the routing is the
  noise-free one, with the evaluation capacity factor; train() switches back."""
  layer = make_layer('tokens_choice', dict(k=1, capacity_factor=1.0, eval_capacity_factor=2.0,
                                           noise_std=1.0))
  x = make_x()
  # Functional style: return the router so that its advanced RNG state is kept.
  step = jit(lambda router, x: (router(x), router))
  a, router = step(layer.router, x)
  b, _ = step(router, x)
  assert a.capacity == 2                                   # ceil(8 * 1.0 / 4)
  assert not np.allclose(a.token_weight, b.token_weight)   # fresh noise on every call
  layer.eval()
  assert layer.router.deterministic
  # nnx.jit here, jax.jit everywhere else in these tests.
  route = nnx.jit(lambda router, x: router(x))
  a, b = route(layer.router, x), route(layer.router, x)
  ref = jit(lambda gate, x: routing.tokens_choice(gate(x), k=1, capacity_factor=2.0))(
      layer.router.gate, x)
  assert a.capacity == 4                                   # ceil(8 * 2.0 / 4)
  for got in (a, b):
    np.testing.assert_array_equal(got.slot_token, ref.slot_token)
    np.testing.assert_allclose(got.slot_weight, ref.slot_weight, rtol=1e-6)
  layer.train()
  assert not layer.router.deterministic
  assert nnx.eval_shape(lambda r, x: r(x), layer.router, x).capacity == 2

"""Sharded MoeLayer == single-device MoeLayer (forward, aux, metrics, gradients), 8 devices.

Run by test_expert_parallel.py in a subprocess with 8 simulated CPU devices.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax import layers, parallel
from tests.parallel._harness import run_checks

TOL = 1e-5
ROUTER_KWARGS = {
    # capacity_factor 1.0 with k=2 drops tokens, so dropped_fraction / expert_load matter.
    'tokens_choice': dict(k=2, capacity_factor=1.0, z_loss_weight=1e-3, importance_weight=5e-3),
    'experts_choice': dict(capacity_factor=2.0, z_loss_weight=1e-3),
    'soft_moe': dict(num_slots=2),
}


def _loss(model, x, t):
  y, aux = model(x)
  return jnp.sum(y * t) + sum(aux['losses'].values()), (y, aux)


_grad_fn = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1), has_aux=True))


def _close(name, a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (name, a.shape, b.shape)
  err = np.max(np.abs(a - b) / (1.0 + np.abs(b))) if a.size else 0.0
  assert err <= TOL, f'{name}: max relative error {err:.3g} > {TOL}'


def compare(router, engine, mesh_cfg, *, glu=False, group_size=None, batch=8, seq=6):
  kw = ROUTER_KWARGS[router]
  layer = layers.MoeLayer(8, 8, 16, router=router, router_kwargs=kw, engine=engine, glu=glu,
                          group_size=group_size, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (batch, seq, 8))
  t = jax.random.normal(jax.random.key(2), (batch, seq, 8))
  (l0, (y0, a0)), (gm0, gx0) = _grad_fn(layer, x, t)            # one device, no mesh
  if router == 'tokens_choice':
    assert float(a0['metrics']['dropped_fraction']) > 0, 'test meant to drop tokens'
  mesh = parallel.make_mesh(mesh_cfg)
  with jax.set_mesh(mesh):
    parallel.shard_module(layer, mesh)
    xs, ts = parallel.shard_batch((np.asarray(x), np.asarray(t)), mesh)
    (l1, (y1, a1)), (gm1, gx1) = _grad_fn(layer, xs, ts)
  # Output split over the batch shards like the input.
  assert y1.sharding.shard_shape(y1.shape)[0] == batch // parallel.num_batch_shards(mesh)
  _close('loss', l1, l0)
  _close('y', y1, y0)
  assert set(a1['losses']) == set(a0['losses']) and set(a1['metrics']) == set(a0['metrics'])
  for k in a0['losses']:
    _close(f'aux loss {k}', a1['losses'][k], a0['losses'][k])
  for k in a0['metrics']:
    _close(f'metric {k}', a1['metrics'][k], a0['metrics'][k])
  _close('grad x', gx1, gx0)
  g0 = nnx.state(gm0).flat_state()
  g1 = dict(nnx.state(gm1).flat_state())
  assert len(g0) >= 3
  for path, v in g0:
    _close(f'grad {"/".join(map(str, path))}', g1[path][...], v[...])


def check_tokens_choice_gather():
  compare('tokens_choice', 'gather', dict(data=2, expert=4))


def check_tokens_choice_einsum():
  compare('tokens_choice', 'einsum', dict(data=2, expert=4))


def check_experts_choice_gather():
  compare('experts_choice', 'gather', dict(data=2, expert=4))


def check_experts_choice_einsum():
  compare('experts_choice', 'einsum', dict(data=2, expert=4))


def check_soft_moe_einsum():
  compare('soft_moe', 'einsum', dict(data=2, expert=4))


def check_soft_moe_gather():
  compare('soft_moe', 'gather', dict(data=2, expert=4))


def check_tensor_parallel_glu():
  # data=2, expert=2, model=2: experts' hidden axis split, partial sums psum'd over 'model'.
  compare('tokens_choice', 'gather', dict(data=2, expert=2, model=2), glu=True)


def check_auto_mesh_group_size():
  # An Auto (compiler-propagated) mesh, all 8 devices on 'expert', 2 routing groups per device.
  compare('tokens_choice', 'einsum', dict(data=1, expert=8, axis_types='auto'), group_size=3)


if __name__ == '__main__':
  run_checks(dict(globals()))

"""Sharded MoeLayer == single-device MoeLayer (forward, aux, metrics, gradients), 8 devices.

Run by test_expert_parallel.py in a subprocess with 8 simulated CPU devices.
"""
import jax
from flax import nnx

from moe_jax import layers, parallel
from tests.parallel._compare import assert_same_results, one_device_then_mesh
from tests.parallel._harness import run_checks

ROUTER_KWARGS = {
    # capacity_factor 1.0 with k=2 drops tokens, so dropped_fraction / expert_load matter.
    'tokens_choice': dict(k=2, capacity_factor=1.0, z_loss_weight=1e-3, importance_weight=5e-3),
    'experts_choice': dict(capacity_factor=2.0, z_loss_weight=1e-3),
    'soft_moe': dict(num_slots=2),
}


def compare(router, engine, mesh_cfg, *, glu=False, group_size=None, batch=8, seq=6):
  kw = ROUTER_KWARGS[router]
  layer = layers.MoeLayer(8, 8, 16, router=router, router_kwargs=kw, engine=engine, glu=glu,
                          group_size=group_size, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (batch, seq, 8))
  t = jax.random.normal(jax.random.key(2), (batch, seq, 8))
  ref, got, mesh = one_device_then_mesh(layer, x, t, mesh_cfg)
  if router == 'tokens_choice':
    assert float(ref[0][1][1]['metrics']['dropped_fraction']) > 0, 'test meant to drop tokens'
  # Output split over the batch shards like the input.
  y1 = got[0][1][0]
  assert y1.sharding.shard_shape(y1.shape)[0] == batch // parallel.num_batch_shards(mesh)
  assert_same_results(got, ref)


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

"""The dropless engine under a mesh == single-device dropless (forward, aux, metrics,
gradients), 8 simulated CPU devices.

Run by test_expert_parallel.py in a subprocess. The routing is deliberately unbalanced
(capacity would drop choices), so rows per (device, expert) vary and some devices
receive far more rows than others. Engine options reach the layer as `engine_kwargs`.
"""
import jax
import numpy as np
from flax import nnx

from moe_jax import layers, parallel
from tests.parallel._compare import assert_same_results, one_device_then_mesh
from tests.parallel._harness import run_checks


def compare(mesh_cfg, *, router='tokens_choice', kw=None, glu=False, engine_kwargs=None,
            skew=True):
  kw = dict(k=2, capacity_factor=1.0, z_loss_weight=1e-3) if kw is None else kw
  layer = layers.MoeLayer(8, 8, 16, router=router, router_kwargs=kw, engine='dropless',
                          engine_kwargs=engine_kwargs, glu=glu, rngs=nnx.Rngs(0))
  layer.experts.b_in[...] = 0.1 * jax.random.normal(jax.random.key(3), (8, 16))
  layer.experts.b_out[...] = 0.1 * jax.random.normal(jax.random.key(4), (8, 8))
  if skew and router == 'tokens_choice':   # most tokens pick experts 0 and 5
    gate = layer.router.gate.kernel
    gate[...] = gate[...].at[:, 0].add(1.5).at[:, 5].add(1.0)
  x = jax.random.normal(jax.random.key(1), (8, 6, 8)) + 0.5
  t = jax.random.normal(jax.random.key(2), (8, 6, 8))
  ref, got, _ = one_device_then_mesh(layer, x, t, mesh_cfg)
  if router == 'tokens_choice':
    assert float(ref[0][1][1]['metrics']['dropped_fraction']) > 0.1, 'meant to be unbalanced'
  assert_same_results(got, ref)


def check_dropless_expert8():
  # Every device holds one expert; the padded all_to_all fallback on CPU.
  compare(dict(data=1, expert=8))


def check_dropless_data2_expert4_emulated_exchange():
  # The offsets that would go to ragged_all_to_all, through its all_gather emulation.
  compare(dict(data=2, expert=4), engine_kwargs=dict(exchange='emulated'))


def check_dropless_tensor_parallel_glu():
  # model=2: partial sums over the hidden slices, b_out added after the psum.
  compare(dict(data=2, expert=2, model=2), glu=True)


def check_dropless_ragged_dot_local_experts():
  # The GPU/TPU local compute (ragged_dot, E/n x the FLOPs on CPU) with the padded exchange.
  compare(dict(data=2, expert=4), engine_kwargs=dict(impl='ragged'))


def check_dropless_experts_choice_falls_back_to_buffers():
  compare(dict(data=2, expert=4), router='experts_choice', kw=dict(capacity_factor=2.0))


def check_dropless_ragged_all_to_all_lowers():
  """XLA:CPU cannot compile ragged_all_to_all: check the 'ragged' exchange lowers to it."""
  layer = layers.MoeLayer(8, 8, 16, router='tokens_choice', router_kwargs=dict(k=2),
                          engine='dropless', engine_kwargs=dict(exchange='ragged'),
                          rngs=nnx.Rngs(0))
  mesh = parallel.make_mesh(dict(data=1, expert=8))
  with jax.set_mesh(mesh):
    parallel.shard_module(layer, mesh)
    xs = parallel.shard_batch(np.zeros((8, 6, 8), np.float32), mesh)
    text = nnx.jit(lambda m, x: m(x)[0]).lower(layer, xs).as_text()
  assert text.count('ragged_all_to_all') >= 2, 'expected a dispatch and a return exchange'


if __name__ == '__main__':
  run_checks(dict(globals()))

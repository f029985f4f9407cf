"""The dropless engine under a mesh == single-device dropless (forward, aux, metrics,
gradients), 8 simulated CPU devices.

Run by test_expert_parallel.py in a subprocess. The routing is deliberately unbalanced
(capacity would drop choices), so rows per (device, expert) vary and some devices
receive far more rows than others.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax import layers, parallel
from moe_jax.layers import engines
from tests.parallel._harness import run_checks
from tests.parallel.checks_equivalence import _close, _loss


def compare(mesh_cfg, *, router='tokens_choice', kw=None, glu=False, engine=None, skew=True):
  kw = dict(k=2, capacity_factor=1.0, z_loss_weight=1e-3) if kw is None else kw
  layer = layers.MoeLayer(8, 8, 16, router=router, router_kwargs=kw, engine='dropless', glu=glu,
                          rngs=nnx.Rngs(0))
  layer.experts.b_in[...] = 0.1 * jax.random.normal(jax.random.key(3), (8, 16))
  layer.experts.b_out[...] = 0.1 * jax.random.normal(jax.random.key(4), (8, 8))
  if skew and router == 'tokens_choice':   # most tokens pick experts 0 and 5
    gate = layer.router.gate.kernel
    gate[...] = gate[...].at[:, 0].add(1.5).at[:, 5].add(1.0)
  x = jax.random.normal(jax.random.key(1), (8, 6, 8)) + 0.5
  t = jax.random.normal(jax.random.key(2), (8, 6, 8))
  saved = engines.ENGINES['dropless']
  if engine is not None:
    engines.ENGINES['dropless'] = engine
  # A fresh jit per call: the engine is looked up by name at trace time, so a cached
  # trace would hide an engine swapped in above.
  grad_fn = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1), has_aux=True))
  try:
    (l0, (y0, a0)), (gm0, gx0) = grad_fn(layer, x, t)          # one device, no mesh
    if router == 'tokens_choice':
      assert float(a0['metrics']['dropped_fraction']) > 0.1, 'meant to be unbalanced'
    mesh = parallel.make_mesh(mesh_cfg)
    with jax.set_mesh(mesh):
      parallel.shard_module(layer, mesh)
      xs, ts = parallel.shard_batch((np.asarray(x), np.asarray(t)), mesh)
      (l1, (y1, a1)), (gm1, gx1) = grad_fn(layer, xs, ts)
  finally:
    engines.ENGINES['dropless'] = saved
  _close('loss', l1, l0)
  _close('y', y1, y0)
  for k in a0['losses']:
    _close(f'aux loss {k}', a1['losses'][k], a0['losses'][k])
  for k in a0['metrics']:
    _close(f'metric {k}', a1['metrics'][k], a0['metrics'][k])
  _close('grad x', gx1, gx0)
  g0 = nnx.state(gm0).flat_state()
  g1 = dict(nnx.state(gm1).flat_state())
  for path, v in g0:
    _close(f'grad {"/".join(map(str, path))}', g1[path][...], v[...])


def check_dropless_expert8():
  # Every device holds one expert; the padded all_to_all fallback on CPU.
  compare(dict(data=1, expert=8))


def check_dropless_data2_expert4_emulated_exchange():
  # The offsets that would go to ragged_all_to_all, through its all_gather emulation.
  compare(dict(data=2, expert=4), engine=engines.DroplessEngine(exchange='emulated'))


def check_dropless_tensor_parallel_glu():
  # model=2: partial sums over the hidden slices, b_out added after the psum.
  compare(dict(data=2, expert=2, model=2), glu=True)


def check_dropless_ragged_dot_local_experts():
  # The GPU/TPU local compute (ragged_dot, E/n x the FLOPs on CPU) with the padded exchange.
  compare(dict(data=2, expert=4), engine=engines.DroplessEngine(impl='ragged'))


def check_dropless_experts_choice_falls_back_to_buffers():
  compare(dict(data=2, expert=4), router='experts_choice', kw=dict(capacity_factor=2.0))


def check_dropless_ragged_all_to_all_lowers():
  """XLA:CPU cannot compile ragged_all_to_all: check the 'ragged' exchange lowers to it."""
  layer = layers.MoeLayer(8, 8, 16, router='tokens_choice', router_kwargs=dict(k=2),
                          engine='dropless', rngs=nnx.Rngs(0))
  saved = engines.ENGINES['dropless']
  engines.ENGINES['dropless'] = engines.DroplessEngine(exchange='ragged')
  try:
    mesh = parallel.make_mesh(dict(data=1, expert=8))
    with jax.set_mesh(mesh):
      parallel.shard_module(layer, mesh)
      xs = parallel.shard_batch(np.zeros((8, 6, 8), np.float32), mesh)
      text = nnx.jit(lambda m, x: m(x)[0]).lower(layer, xs).as_text()
  finally:
    engines.ENGINES['dropless'] = saved
  assert text.count('ragged_all_to_all') >= 2, 'expected a dispatch and a return exchange'


if __name__ == '__main__':
  run_checks(dict(globals()))

"""Trainer under a mesh: checkpoints resume on other meshes, DeepSeek bias, clear errors.

Run by test_trainer_mesh.py in a subprocess with 8 simulated CPU devices.
"""
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe_jax import parallel
from moe_jax.train import device_mesh as sharded, steps
from moe_jax.tasks import ImageClassification
from moe_jax.train.builders import build_model
from moe_jax.train.trainer import train_and_evaluate
from scripts.compare_mesh_losses import losses, tiny_config
from tests.parallel._harness import run_checks
from tests.train.vit_helpers import mock_fashion_mnist, persistent_xla_cache

STEPS, CUT = 4, 2


def check_checkpoint_restores_onto_other_meshes():
  """Saved on (data=2, expert=4) after step 2; resumed on 1 device and on (4, 2).

  Both resumed runs log the losses of an uninterrupted 1-device run (1e-4): the params,
  the optimizer state and the data position came back, resharded.
  """
  with tempfile.TemporaryDirectory() as tmp, mock_fashion_mnist(), \
      persistent_xla_cache(os.path.join(tmp, 'xla')):
    ref = losses(train_and_evaluate(tiny_config('tokens_choice', STEPS), f'{tmp}/ref'))
    assert train_and_evaluate(tiny_config('tokens_choice', STEPS, (2, 4)), f'{tmp}/a',
                              stop_at_step=CUT) is None
    shutil.copytree(f'{tmp}/a', f'{tmp}/b')
    out = {}
    for wd, mesh in (('a', (1, 1)), ('b', (4, 2))):
      res = train_and_evaluate(tiny_config('tokens_choice', STEPS, mesh), f'{tmp}/{wd}')
      assert [s for s, _ in res['train_loss']] == list(range(1, STEPS + 1)), res['train_loss']
      out[mesh] = losses(res)
  print('uninterrupted 1 device:', ref, ' saved on (2,4), resumed on 1 device:', out[(1, 1)],
        ' on (4,2):', out[(4, 2)], flush=True)
  for got in out.values():
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def _deepseek_train(mesh, batches):
  config = tiny_config('tokens_choice', 3, **{'model.moe.router': 'deepseek'})
  config.model.moe.router_kwargs = dict(k=2, bias_update_rate=0.01)
  with sharded.mesh_context(mesh):
    model = build_model(config, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    sharded.place_state(mesh, model, optimizer)
    step = steps.make_train_step(model, optimizer, lambda s: 1e-2, ImageClassification(config))
    state = nnx.state((model, optimizer))
    for b in batches:
      state, _ = step(state, sharded.put_batch(mesh, b))
  nnx.update((model, optimizer), state)
  return model.blocks[1].mlp.router.expert_bias[...]


def check_deepseek_bias_identical_on_all_devices():
  """The aux-loss-free bias (global counts) is replicated and equals 1-device training."""
  rng = np.random.default_rng(0)
  batches = [dict(image=rng.normal(size=(16, 28, 28, 1)).astype(np.float32),
                  label=rng.integers(0, 10, 16).astype(np.int32)) for _ in range(3)]
  ref = _deepseek_train(None, batches)
  mesh = parallel.make_mesh(dict(data=2, expert=4, axis_types='auto'))
  bias = _deepseek_train(mesh, batches)
  assert bias.sharding.is_fully_replicated, bias.sharding
  shards = [np.asarray(s.data) for s in bias.addressable_shards]
  assert len(shards) == 8 and all(np.array_equal(s, shards[0]) for s in shards)
  np.testing.assert_allclose(shards[0], np.asarray(ref), atol=1e-6)
  assert np.abs(shards[0]).max() > 0, shards[0]


def _raises(fn, *words):
  try:
    fn()
  except ValueError as e:
    assert all(w in str(e) for w in words), f'error lacks {words}: {e}'
    return
  raise AssertionError(f'no ValueError (expected one mentioning {words})')


def check_clear_errors():
  cfg = lambda mesh, **kw: tiny_config('tokens_choice', 2, mesh, **kw)
  _raises(lambda: sharded.trainer_mesh(cfg((2, 2))), 'needs 4 devices', '8 are available',
          '--config.mesh')
  _raises(lambda: sharded.trainer_mesh(cfg((2, 4), batch_size=12)), 'config.batch_size: 12',
          'multiple of 8')
  _raises(lambda: sharded.trainer_mesh(cfg((2, 4), eval_batch_size=20)),
          'config.eval_batch_size: 20', 'multiple of 8')
  six = cfg((2, 4), **{'model.moe.num_experts': 6})
  _raises(lambda: sharded.check_model_fits(sharded.trainer_mesh(six),
                                           build_model(six, rngs=nnx.Rngs(0))),
          'has 6 experts', 'config.mesh.expert')
  assert sharded.trainer_mesh(cfg((1, 1))) is None      # one device, no mesh
  assert sharded.trainer_mesh(cfg((-1, 2))).shape == dict(data=4, expert=2, model=1)


if __name__ == '__main__':
  run_checks(dict(globals()))

"""Trainer: loss, routing scalars, non-Param state, a short run, exact resume, the CLI."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy.special import log_softmax

from moe_jax import routing
from moe_jax.layers import ROUTERS, TokensChoiceRouter
from moe_jax.models import ViT, token_ids
from moe_jax.routing import hashing
from moe_jax.train import steps, writers
from moe_jax.train.builders import build_model
from moe_jax.train.trainer import train_and_evaluate
from tests.train.vit_helpers import (ROOT, image_task, mock_fashion_mnist, persistent_xla_cache,
                                     tiny_config)


def test_loss_terms_is_mean_cross_entropy_plus_every_aux_loss():
  rng = np.random.default_rng(0)
  logits, labels = rng.normal(size=(5, 4)).astype(np.float32), np.array([0, 3, 1, 1, 2])
  aux = {'block_01': {'losses': {'load_balancing': 0.25, 'router_z': 0.125}, 'metrics': {}},
         'block_03': {'losses': {'load_balancing': 0.5}, 'metrics': {}}}
  batch = {'label': jnp.asarray(labels)}
  task_loss, per_example_loss, _ = image_task().loss(jnp.asarray(logits), batch)
  total, terms = steps.loss_terms(task_loss, per_example_loss, aux)
  per_example = -log_softmax(logits, axis=-1)[np.arange(5), labels]
  np.testing.assert_allclose(per_example_loss, per_example, rtol=1e-5)
  np.testing.assert_allclose(-terms['rewards'], per_example, rtol=1e-5)
  np.testing.assert_allclose(total, per_example.mean() + 0.875, rtol=1e-5)
  assert set(terms['aux_losses']) == {'block_01/load_balancing', 'block_01/router_z',
                                      'block_03/load_balancing'}
  smooth, _, _ = image_task(label_smoothing=0.1).loss(jnp.asarray(logits), batch)
  target = np.full((5, 4), 0.1 / 4) + 0.9 * np.eye(4)[labels]
  np.testing.assert_allclose(smooth, -(target * log_softmax(logits, -1)).sum(-1).mean(),
                             rtol=1e-5)


def test_routing_scalars_summarise_expert_load():
  aux = {'block_02': {'losses': {'lb': jnp.float32(0.5)},
                      'metrics': {'expert_load': jnp.array([0.5, 0.25, 0.25, 0.0]),
                                  'dropped_fraction': jnp.float32(0.1)}}}
  s = steps.routing_scalars(aux)
  np.testing.assert_allclose(s['routing/block_02/expert_load_max'], 2.0)
  np.testing.assert_allclose(s['routing/block_02/expert_load_min'], 0.0)
  np.testing.assert_allclose(s['routing/block_02/expert_load_cv'], np.std([.5, .25, .25, 0]) / 0.25, rtol=1e-6)
  np.testing.assert_allclose(s['routing/block_02/dropped_fraction'], 0.1)
  np.testing.assert_allclose(s['routing/block_02/lb_weighted'], 0.5)


class _BiasedRouter(TokensChoiceRouter):
  """Token choice plus a DeepSeek-style bias (not a Param) updated from each batch's load."""

  def __init__(self, d_model, num_experts, *, rngs, **kw):
    super().__init__(d_model, num_experts, rngs=rngs, **kw)
    self.bias = nnx.Variable(jnp.zeros((num_experts,)))
    self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

  def __call__(self, x, *, token_ids=None):
    r = super().__call__(x, token_ids=token_ids)
    load = jax.lax.stop_gradient(r.metrics['expert_load'])
    self.bias[...] = self.bias[...] + 0.1 * (1.0 / load.shape[0] - load)
    self.calls[...] = self.calls[...] + 1
    return r


def test_train_step_updates_params_and_keeps_non_param_state(monkeypatch):
  monkeypatch.setitem(ROUTERS, 'biased', _BiasedRouter)
  model = ViT(num_classes=10, image_size=28, channels=1, patch_size=7, width=16, depth=2, mlp_dim=32,
              num_heads=2, moe=dict(router='biased', num_experts=4, last_n=1), rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  train_step = steps.make_train_step(model, optimizer, lambda step: 1e-2, image_task())
  batch = {'image': jax.random.normal(jax.random.key(0), (8, 28, 28, 1)),
           'label': jnp.arange(8) % 10}
  state = nnx.state((model, optimizer))
  params_before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
  for _ in range(3):
    state, metrics = train_step(state, batch)
  nnx.update((model, optimizer), state)
  router = model.blocks[1].mlp.router
  assert int(router.calls[...]) == 3
  assert np.abs(np.asarray(router.bias[...])).sum() > 0
  assert int(optimizer.step[...]) == 3
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       nnx.state(model, nnx.Param), params_before)
  assert max(jax.tree.leaves(moved)) > 0
  # The bias is not optimised: it is absent from the optimizer state.
  opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      nnx.state(optimizer))[0]]
  assert not any('bias' in p and 'router' in p for p in opt_paths)
  assert {'routing/block_01/dropped_fraction', 'loss', 'learning_rate'} <= set(metrics)


def _losses(workdir):
  return {r['step']: r['train/loss'] for r in writers.read_jsonl(workdir) if 'train/loss' in r}


@pytest.mark.slow
def test_short_run_then_interrupted_and_resumed_run_match(tmp_path):
  """Outputs of a 6-step run; a run stopped after step 3 and resumed logs the same losses (1e-6).

  Token choice with router noise and batch priority: resuming must restore the RNG state,
  the optimizer and the data position.
  """
  config = tiny_config('tokens_choice,tiny', **{'model.moe.router_kwargs.noise_std': 0.5})
  with mock_fashion_mnist(), persistent_xla_cache(str(tmp_path / 'xla')):
    full = train_and_evaluate(config, str(tmp_path / 'full'))
    assert train_and_evaluate(config, str(tmp_path / 'cut'), stop_at_step=3) is None
    assert not os.path.exists(tmp_path / 'cut' / 'results.json')
    resumed = train_and_evaluate(config, str(tmp_path / 'cut'))
    again = train_and_evaluate(config, str(tmp_path / 'cut'))     # finished: just reports

  wd = tmp_path / 'full'
  on_disk = json.load(open(wd / 'results.json'))
  assert on_disk['final'] == full['final'] and 0 <= full['final']['test_accuracy'] <= 1
  assert full['params']['total'] > full['params']['active'] > 0
  assert full['train_flops'] is None      # count_flops=False (FLOPs: test_vit_flops, test_vit_sweep)
  assert full['config']['model']['moe']['router'] == 'tokens_choice'
  assert os.listdir(wd / 'checkpoints') and any(f.startswith('events.out') for f in os.listdir(wd))
  records = writers.read_jsonl(str(wd))
  assert any('train/routing/block_01/dropped_fraction' in r for r in records)
  assert any('train/routing/block_01/expert_load_max' in r for r in records)
  assert any('eval/accuracy' in r and r['step'] == 3 for r in records)
  assert any('steps_per_sec' in r for r in records)

  a, b = _losses(str(tmp_path / 'full')), _losses(str(tmp_path / 'cut'))
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]      # nothing logged twice
  for step in a:
    assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
  assert resumed['final']['test_accuracy'] == full['final']['test_accuracy']
  assert abs(resumed['final']['test_loss'] - full['final']['test_loss']) <= 1e-6
  assert again == resumed


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir('/usr/share/datasets/fashion-mnist'),
                    reason='dataset-fashion-mnist is not installed')
def test_cli_trains_on_the_local_fashion_mnist_and_its_exit_statuses_say_what_happened(tmp_path):
  """The real command on Debian's Fashion-MNIST (a 2000-image test split, prepared offline):
  stopped (75), resumed to the end (0), bad input (2), diverged (3); the cause is printed
  once, without a traceback."""
  from moe_jax.data import prepare
  files = {'test': prepare.find_idx_files(prepare.DEFAULT_IDX_DIR)['test']}
  prepare.LocalFashionMnist(idx_files=files, limit=2000, data_dir=str(tmp_path / 'tfds')).download_and_prepare()

  def cli(workdir, *extra):
    cmd = [sys.executable, '-m', 'moe_jax.train.main', '--config=configs/vit/fashion_mnist.py:dense,tiny',
           f'--workdir={workdir}', f'--config.data.data_dir={tmp_path / "tfds"}',
           '--config.model.width=16', '--config.model.mlp_dim=32', '--config.model.num_heads=2',
           '--config.data.train_split=test[:1500]', '--config.data.eval_split=test[1500:]',
           '--config.num_train_steps=4', '--config.log_every_steps=2', '--config.eval_every_steps=4',
           '--config.checkpoint_every_steps=2', '--config.model.patch_size=7',
           '--config.model.depth=2', '--config.count_flops=False',
           '--config.optimizer.warmup_steps=1', *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))

  wd = tmp_path / 'wd'
  out = cli(wd, '--stop_at_step=2')
  assert out.returncode == 75, out.stderr[-3000:]
  assert 'rerun the same command to resume' in out.stdout
  out = cli(wd)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'test accuracy' in out.stdout and 'Traceback' not in out.stderr
  results = json.load(open(wd / 'results.json'))
  assert results['steps'] == 4 and results['config']['data']['train_split'] == 'test[:1500]'

  out = cli(tmp_path / 'bad', '--config.model.moe.router=nope')
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert out.stderr.count("config.model.moe.router: 'nope'") == 1
  assert not (tmp_path / 'bad').exists()

  out = cli(tmp_path / 'nan', '--config.optimizer.learning_rate=1e6',
            '--config.optimizer.grad_clip_norm=0', '--config.num_train_steps=8',
            '--config.eval_every_steps=8')
  assert out.returncode == 3, out.stderr[-3000:]
  assert 'diverged (exit status 3): training diverged at step' in out.stderr
  assert 'Traceback' not in out.stderr


def test_a_signal_sets_the_stop_flag_and_says_which():
  import signal
  from moe_jax.train.trainer import _StopFlag
  with _StopFlag() as flag:
    signal.raise_signal(signal.SIGTERM)     # delivered at once, in this thread
    assert flag.stop and flag.signal == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is not flag._handle   # the old handler is back


def test_hash_router_with_patch_content_ids_trains_in_the_vit():
  """config: router=hash, token_ids=patch_content -> ids from the pixels reach the router."""
  config = tiny_config('dense,tiny', **{'model.token_ids': 'patch_content'})
  config.model.moe.router = 'hash'
  config.model.moe.router_kwargs = dict(kind='random', seed=7)
  config.model.moe.num_experts = 4
  model = build_model(config, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  train_step = steps.make_train_step(model, optimizer, lambda step: 3e-3, image_task())
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (8, 28, 28, 1)).astype(np.float32)
  pixels[:4, :14] = 0                                  # flat dark patches: one shared id
  images = jnp.asarray(pixels * (2 / 255) - 1)         # the data pipeline's [-1, 1]
  batch = {'image': images, 'label': jnp.arange(8) % 10}
  state = nnx.state((model, optimizer))
  losses = []
  for _ in range(4):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0]
  # The routing follows the hash of the patch-content ids of these pixels.
  ids = token_ids.patch_content_ids(images, patch_size=7, num_tokens=16, value_range=(-1.0, 1.0))
  expert = np.asarray(hashing.hash_experts(ids, 4, kind='random', seed=7))[..., 0]
  load = np.stack([np.bincount(e, minlength=4) / 16 for e in expert]).mean(0)
  np.testing.assert_allclose(metrics['routing/block_01/expert_load_max'], load.max() * 4, rtol=1e-5)
  np.testing.assert_allclose(metrics['routing/block_01/expert_load_min'], load.min() * 4, rtol=1e-5)
  assert len(np.unique(np.asarray(ids)[:4, :4])) == 1   # the dark patches share an id

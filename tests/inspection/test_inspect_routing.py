"""Routing pictures end to end: the trainer's logged load vectors and TensorBoard images,
and `scripts/inspect_routing` on tiny trained workdirs of both model families and a
sample of routers (sparse, Soft MoE, dense-form DSelect-k in training mode, hash)."""
import glob
import os
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from moe_jax.inspection import views as views_lib
from moe_jax.train import workdir as workdir_lib
from moe_jax.train import writers
from moe_jax.train.trainer import train_and_evaluate
from scripts import inspect_routing
from tests.train.lm_helpers import mock_text, tiny_lm_config
from tests.train.vit_helpers import mock_fashion_mnist, tiny_config

pytestmark = pytest.mark.slow
LOAD = 'routing/block_01/expert_load'


def _train_vit(workdir, router: str) -> str:
  # 64 mock eval images in one batch: the eval load vector is that batch's.
  config = tiny_config(f'{router},tiny', num_train_steps=2, eval_every_steps=2,
                       eval_batch_size=64, **{'optimizer.warmup_steps': 1})
  with mock_fashion_mnist():
    train_and_evaluate(config, str(workdir))
  return str(workdir)


def _inspect(workdir: str, out, *args) -> list[str]:
  return inspect_routing.main([f'--workdir={workdir}', f'--out={out}', '--examples=2', *args])


def _check_png(path: str) -> None:
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n', path
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    assert min(im.size) >= 40, (path, im.size)


def _check_html(path: str, *needles: str) -> None:
  text = open(path, encoding='utf-8').read()
  assert text.startswith('<!DOCTYPE html>') and text.rstrip().endswith('</html>'), path
  for needle in needles:
    assert needle in text, (path, needle)


def _check_outputs(paths: list[str], out, expected: list[str]) -> None:
  names = {os.path.relpath(p, out) for p in paths}
  assert set(expected) <= names, sorted(names)
  for p in paths:
    assert os.path.getsize(p) > 0
    if p.endswith('.png'):
      _check_png(p)
    elif p.endswith('.html'):
      _check_html(p)


@pytest.fixture(scope='module')
def tokens_choice_workdir(tmp_path_factory):
  return _train_vit(tmp_path_factory.mktemp('tc'), 'tokens_choice')


def _tensorboard_tags(workdir: str) -> set[str]:
  tags = set()
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  return tags


def test_logged_load_vectors_sum_to_one_and_match_the_routing_metrics(tokens_choice_workdir):
  records = writers.read_jsonl(tokens_choice_workdir)
  scalars = {(r['step'], split): r for r in records for split in ('train', 'eval')
             if f'{split}/{LOAD}_max' in r}
  vectors = [(r['step'], split, np.asarray(r[f'{split}/{LOAD}']))
             for r in records for split in ('train', 'eval') if f'{split}/{LOAD}' in r]
  assert sorted((s, split) for s, split, _ in vectors) == [(1, 'train'), (2, 'eval'),
                                                           (2, 'train')]
  for step, split, load in vectors:     # one step per logging window, one eval batch
    assert load.shape == (4,) and np.all(load >= 0)
    assert load.sum() == pytest.approx(1.0, abs=1e-6)
    logged = scalars[step, split]
    assert load.max() * 4 == pytest.approx(logged[f'{split}/{LOAD}_max'], abs=1e-5)
    assert load.min() * 4 == pytest.approx(logged[f'{split}/{LOAD}_min'], abs=1e-5)
    assert load.std() / load.mean() == pytest.approx(logged[f'{split}/{LOAD}_cv'], abs=1e-5)
  tags = _tensorboard_tags(tokens_choice_workdir)
  assert {f'train/{LOAD}', f'eval/{LOAD}', 'routing/patch_experts', 'routing/load_train'} <= tags


def test_script_draws_a_sparse_router(tokens_choice_workdir, tmp_path):
  with mock_fashion_mnist():
    paths = _inspect(tokens_choice_workdir, tmp_path)
  _check_outputs(paths, tmp_path, ['patch_experts.png', 'load_train.png', 'load_eval.png',
                                   'index.html'])
  _check_html(str(tmp_path / 'index.html'), 'patch_experts.png', 'load_train.png')


def test_script_draws_soft_moe_slots(tmp_path):
  workdir = _train_vit(tmp_path / 'wd', 'soft_moe')
  with mock_fashion_mnist():
    paths = _inspect(workdir, tmp_path / 'out')
  _check_outputs(paths, tmp_path / 'out', ['patch_experts.png', 'block_01.soft_slots.png',
                                           'load_train.png'])


def test_script_draws_dense_form_routing_in_training_mode(tmp_path):
  """DSelect-k trains with every token at every expert (a slot table with C = S) and
  evaluates with at most k = 2 experts per token; --mode picks which one is drawn."""
  workdir = _train_vit(tmp_path / 'wd', 'dselect_k')
  with mock_fashion_mnist():
    paths = _inspect(workdir, tmp_path / 'out', '--mode=train')
    _check_outputs(paths, tmp_path / 'out', ['patch_experts.png', 'load_train.png'])
    model, config = workdir_lib.load_model(workdir)
    images = np.random.default_rng(0).normal(size=(3, 28, 28, 1)).astype(np.float32)
    model.train()
    dense = views_lib.routing_views(model, {'images': images})['block_01']
    model.eval()
    sparse = views_lib.routing_views(model, {'images': images})['block_01']
  assert np.all(dense['dispatched'] == 1)
  assert np.all(sparse['dispatched'].sum(-1) <= 2) and np.all(sparse['dispatched'] <= 1)


def test_script_draws_text_for_encoder_and_decoder_layers_of_a_hash_routed_lm(tmp_path):
  config = tiny_lm_config('span_corruption', 'hash', str(tmp_path / 'tfds'), num_train_steps=2,
                          eval_every_steps=2, **{'optimizer.warmup_steps': 1})
  workdir = str(tmp_path / 'wd')
  with mock_text():
    train_and_evaluate(config, workdir)
    paths = _inspect(workdir, tmp_path / 'out')
    pictures = inspect_routing.pictures(workdir, examples=2)
  expected = [f'{stack}.block_01.{kind}' for stack in ('encoder', 'decoder')
              for kind in ('tokens.png', 'tokens.html', 'top_tokens.png', 'top_tokens.md')]
  _check_outputs(paths, tmp_path / 'out', expected + ['load_train.png', 'index.html'])
  _check_html(str(tmp_path / 'out' / 'encoder.block_01.tokens.html'), '<span', 'expert ')
  table = open(tmp_path / 'out' / 'decoder.block_01.top_tokens.md').read()
  assert len(re.findall(r'^\| e\d+ \|', table, re.M)) == 4 and 'most frequent tokens' in table
  # A hash router sends every token id to one expert: no token is in two experts' rows.
  assert [p.name for p in pictures[:2]] == ['encoder/block_01/tokens', 'encoder/block_01/top_tokens']
  model, _ = workdir_lib.load_model(workdir)
  model.eval()
  with mock_text():
    from moe_jax import tasks
    task = tasks.TASKS['span_corruption'](config)
    task.prepare()
  batch = next(iter(task.eval_batches()))
  view = views_lib.routing_views(model, task.model_inputs(batch))['encoder/block_01']
  top, valid = views_lib.top_expert(view), batch['input_segment_ids'] > 0
  experts_of = {}
  for token, expert in zip(batch['inputs'][valid], top[valid]):
    experts_of.setdefault(int(token), set()).add(int(expert))
  assert len(experts_of) > 5 and all(len(e) == 1 for e in experts_of.values())

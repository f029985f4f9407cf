"""The language models in the one trainer: every config builds, the decoder refuses
non-causal routers, a few steps on mock text, exact resume, sampling from a workdir."""
import json
import os

import numpy as np
import pytest

from moe_jax.errors import ConfigError
from moe_jax.layers import ROUTERS
from moe_jax.train import config_lib, writers
from moe_jax.train.trainer import train_and_evaluate
from tests.train.lm_helpers import load_config_module, mock_text, tiny_lm_config
from tests.train.vit_helpers import persistent_xla_cache

SPAN = load_config_module('configs/t5/span_corruption.py')
CAUSAL = load_config_module('configs/t5/causal_lm.py')
NOT_CAUSAL = sorted(n for n, c in ROUTERS.items() if not c.causal)


@pytest.mark.parametrize('size', ['tiny', 'small'])
@pytest.mark.parametrize('router', SPAN.ROUTERS)
def test_every_span_corruption_config_builds(router, size):
  c = SPAN.get_config(f'{router},{size}')
  assert c.model.name == 'encoder_decoder' and c.task.name == 'span_corruption'
  assert c.data.vocab_size == c.model.vocab_size == {'tiny': 4096, 'small': 8192}[size]
  config_lib.validate(c)
  # Non-causal routers stay in the encoder; the decoder gets top-2 token choice (T5X).
  want_decoder = router if router == 'dense' or ROUTERS[router].causal else 'tokens_choice'
  assert c.model.decoder_moe.router == want_decoder and c.model.encoder_moe.router == router


@pytest.mark.parametrize('router', [r for r in CAUSAL.ROUTERS if r not in NOT_CAUSAL])
def test_every_causal_lm_config_with_a_causal_router_builds(router):
  c = CAUSAL.get_config(f'{router},tiny')
  config_lib.validate(c)


@pytest.mark.parametrize('router', NOT_CAUSAL)
def test_a_decoder_refuses_routers_that_read_later_tokens(router):
  c = CAUSAL.get_config(f'{router},tiny')
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c)
  msg = str(e.value)
  assert 'config.model.moe.router' in msg and repr(router) in msg
  assert 'switch' in msg and 'allow_future_leak' in msg
  c.model.moe.allow_future_leak = True
  config_lib.validate(c)


def _losses(workdir):
  return {r['step']: r['train/loss'] for r in writers.read_jsonl(str(workdir)) if 'train/loss' in r}


@pytest.mark.slow
@pytest.mark.parametrize('objective, router', [('span_corruption', 'switch'),
                                               ('causal_lm', 'hash')])
def test_lm_trains_then_an_interrupted_run_resumes_exactly(tmp_path, objective, router):
  config = tiny_lm_config(objective, router, str(tmp_path / 'tfds'))
  with mock_text(), persistent_xla_cache(str(tmp_path / 'xla')):
    full = train_and_evaluate(config, str(tmp_path / 'full'))
    assert train_and_evaluate(config, str(tmp_path / 'cut'), stop_at_step=3) is None
    resumed = train_and_evaluate(config, str(tmp_path / 'cut'))
  a, b = _losses(tmp_path / 'full'), _losses(tmp_path / 'cut')
  assert sorted(a) == sorted(b) == list(range(1, 7))
  assert max(abs(a[s] - b[s]) for s in a) <= 1e-6
  assert resumed['final'] == pytest.approx(full['final'], abs=1e-6)
  final = full['final']
  assert final['neg_log_perplexity'] == pytest.approx(-final['validation_loss'])
  assert np.isfinite(final['validation_loss']) and 0 <= final['validation_accuracy'] <= 1
  assert full['tokenizer']['vocab_size'] == 384 and len(full['tokenizer']['sha256']) == 64
  records = writers.read_jsonl(str(tmp_path / 'full'))
  assert any('throughput/target_tokens_per_s' in r for r in records)
  prefix = 'encoder/block_01' if objective == 'span_corruption' else 'decoder/block_01'
  assert any(f'train/routing/{prefix}/expert_load_max' in r for r in records)
  assert any('eval/neg_log_perplexity' in r for r in records)


@pytest.mark.slow
def test_sample_generates_from_a_trained_workdir(tmp_path):
  from scripts import sample
  config = tiny_lm_config('causal_lm', 'switch', str(tmp_path / 'tfds'), num_train_steps=4,
                          eval_every_steps=4)
  with mock_text():
    train_and_evaluate(config, str(tmp_path / 'wd'))
  text, ids = sample.sample(str(tmp_path / 'wd'), 'abc', max_new_tokens=6)
  assert 0 < len(ids) <= 6 and all(0 <= i < 384 for i in ids) and isinstance(text, str)
  again, ids2 = sample.sample(str(tmp_path / 'wd'), 'abc', max_new_tokens=6)
  assert ids2 == ids                                        # greedy: deterministic
  hot, _ = sample.sample(str(tmp_path / 'wd'), 'abc', max_new_tokens=6, temperature=1.0, seed=3)
  assert isinstance(hot, str)


@pytest.mark.parametrize('preset', load_config_module('configs/t5/presets.py').PRESETS)
def test_every_paper_preset_config_builds(preset):
  c = load_config_module('configs/t5/presets.py').get_config(preset)
  assert c.model.vocab_size == 32128 and c.data.inputs_length == 512
  config_lib.validate(c)

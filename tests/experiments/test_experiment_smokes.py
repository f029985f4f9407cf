"""Every experiment config under experiments/: its real variant loads and validates, and
its smoke variant runs end to end (two tiny arms x two seeds x 4 steps on mock data:
prepare hooks, extra evaluations, derived metrics, summary, plots)."""
import glob
import json
import os

import pytest

from moe_jax.experiments import evals, run
from moe_jax.train import config_lib
from tests.train.lm_helpers import VOCAB, mock_text
from tests.train.vit_helpers import mock_fashion_mnist, persistent_xla_cache

EXPERIMENTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(run.ROOT, 'experiments', '*.py'))
                     if not os.path.basename(p).startswith('_'))
NEW = [e for e in EXPERIMENTS if e != 'vit_pareto']      # vit_pareto: tests/experiments/test_runner.py


def test_the_suite_has_every_comparison_of_issue_12():
  assert set(NEW) == {'vit_fig3', 'vit_fig6', 't5_switch_dense', 't5_ec_encoder', 'lm_hash',
                      'lm_base_routing', 'lm_soft_causal', 'lm_ec_leak', 'lm_zloss'}


@pytest.mark.parametrize('name', NEW)
def test_real_variant_arms_validate_and_are_paired(name):
  exp = run.load_experiment(f'experiments/{name}.py')
  assert exp.name.endswith('_cpu') and len(exp.seeds) >= 3
  runs = run.expand(exp, exp.root)
  assert len(runs) == len(exp.arms) * len(exp.seeds)
  for r in runs[::len(exp.seeds)]:
    config = run.run_config(exp, r)
    assert config.seed == exp.seeds[0]
    if 'hash_tables' not in str(dict(r.overrides)):     # tables exist only after `prepare`
      config_lib.validate(config)
  assert exp.claims and all(c.get('paper') and c.get('paper_value') for c in exp.claims)
  with pytest.raises(ValueError, match='unknown variant'):
    run.load_experiment(f'experiments/{name}.py:nope')


def _smoke(name: str, tmp_path):
  """Runs the smoke variant in this process on mock data; returns (exp, runs, root, summary)."""
  exp = run.load_experiment(f'experiments/{name}.py:smoke')
  assert len(exp.arms) == 2 and len(exp.seeds) == 2
  lm = exp.config_file.startswith('configs/t5')
  for arm in exp.arms:
    assert arm['overrides']['num_train_steps'] <= 4
    if lm:
      arm['overrides'].update({'data.data_dir': str(tmp_path / 'tfds'), 'data.vocab_size': VOCAB})
  root = str(tmp_path / 'root')
  runs = run.expand(exp, root)
  with (mock_text() if lm else mock_fashion_mnist()), persistent_xla_cache(str(tmp_path / 'xla')):
    run.run_all(exp, runs, root, run.execute_in_process, execute_eval=evals.run_and_write)
  assert [run.state(r, root) for r in runs] == ['done'] * 4
  summary = run.summarize(exp, run.collect(exp, runs, root))
  paths = run.write_outputs(exp, summary, summary_path=str(tmp_path / 's.json'),
                            plot_path=str(tmp_path / 'p.png'))
  for p in [paths[1]] + ([str(tmp_path / 'p_sweep.png')] if exp.get('sweep') else []):
    assert open(p, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
  assert json.load(open(paths[0]))['experiment'] == exp.name
  assert len(summary['comparisons']) == len(exp.comparisons)
  for c in summary['comparisons']:
    assert c['n'] == 2 and c['verdict']
  return exp, runs, root, summary


@pytest.mark.slow
@pytest.mark.parametrize('name', ['vit_fig3', 'vit_fig6', 't5_switch_dense', 't5_ec_encoder',
                                  'lm_base_routing', 'lm_soft_causal', 'lm_zloss'])
def test_smoke_variant_runs(name, tmp_path):
  exp, runs, root, summary = _smoke(name, tmp_path)
  for d in exp.get('derived', []):
    assert d['name'] in summary['arms'][exp.arms[0]['name']]['derived']


@pytest.mark.slow
def test_hash_smoke_builds_its_tables_from_the_data_and_the_dense_run(tmp_path):
  exp, runs, root, summary = _smoke('lm_hash', tmp_path)
  table = os.path.join(root, 'hash_tables', 'clustered_E4.npy')
  manifest = json.load(open(table[:-4] + '.json'))
  assert manifest['vocab_size'] == VOCAB and sum(manifest['expert_sizes']) == VOCAB
  assert 'dense/seed_0' in manifest['source']
  done = json.load(open(os.path.join(runs[2].workdir(root), 'results.json')))
  assert done['config']['model']['moe']['router_kwargs']['table_path'] == table


@pytest.mark.slow
def test_ec_leak_smoke_evaluates_the_leaky_decoder_twice(tmp_path):
  exp, runs, root, summary = _smoke('lm_ec_leak', tmp_path)
  ec = [r for r in runs if r.arm == 'ec_leaky']
  for r in ec:
    out = json.load(open(evals.output_path(r.workdir(root), 'causal')))
    assert out['overrides'] == {'model.moe.router_kwargs.eval_rule': 'token_top_k'}
    assert set(out['final']) >= {'neg_log_perplexity', 'validation_loss'}
  assert not os.path.exists(evals.output_path(runs[0].workdir(root), 'causal'))   # top2: no
  arm = summary['arms']['ec_leaky']
  assert arm['derived']['leak_gap']['n'] == 2 and arm['evals']['causal']['neg_log_perplexity']['n'] == 2
  rows = {(r['arm'], r['seed']): r for r in summary['runs']}
  row = rows[('ec_leaky', 0)]
  assert row['derived']['leak_gap'] == pytest.approx(
      row['metric'] - row['evals']['causal']['neg_log_perplexity'])
  assert rows[('top2', 0)]['derived']['causal_quality'] == rows[('top2', 0)]['metric']
  leak = summary['comparisons'][0]
  assert leak['a'] == 'ec_leaky (training rule)' and leak['b'] == 'ec_leaky (causal rule)'

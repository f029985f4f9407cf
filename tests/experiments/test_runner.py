"""Experiment runner: arms x seeds, skip finished runs, resume interrupted ones, summary, plots."""
import json
import os

import numpy as np
import pytest

from moe_jax.experiments import plots, run
from scripts import plot_curves, plot_pareto
from tests.train.vit_helpers import mock_fashion_mnist, persistent_xla_cache

TINY = {'model.width': 16, 'model.mlp_dim': 32, 'model.num_heads': 2, 'model.moe.num_experts': 4,
        'model.depth': 1, 'batch_size': 8, 'eval_batch_size': 16, 'count_flops': True}


def test_cpu_variant_compares_five_methods_at_two_sizes():
  exp = run.load_experiment('experiments/vit_pareto.py:cpu')
  runs = run.expand(exp)
  assert len(runs) == 10 and len({r.name for r in runs}) == 10 and {r.seed for r in runs} == {0}
  assert {r.group for r in runs} == {'dense', 'tokens_choice_k1', 'tokens_choice_k2',
                                     'experts_choice', 'soft_moe'}
  assert {r.label for r in runs} == {'tiny', 'small'}
  k2 = next(r for r in runs if r.arm == 'tokens_choice_k2_small')
  config = run.run_config(exp, k2)
  assert config.model.moe.router == 'tokens_choice' and config.model.moe.router_kwargs.k == 2
  assert config.model.size == 'small' and config.num_train_steps == 600 and config.seed == 0
  assert ('soft_moe_tiny', 'dense_tiny') in [tuple(c) for c in exp.comparisons]
  with pytest.raises(ValueError, match='unknown variant'):
    run.load_experiment('experiments/vit_pareto.py:nope')


def test_committed_summary_is_the_runners_format():
  exp = run.load_experiment('experiments/vit_pareto.py:cpu')
  summary = json.load(open(os.path.join(run.ROOT, exp.summary)))
  assert set(summary['arms']) == {a['name'] for a in exp.arms}
  assert summary['arms']['soft_moe_tiny']['metric']['mean'] == pytest.approx(0.859)
  assert all(c['verdict'] == 'not resolved at this budget' for c in summary['comparisons'])


def test_frontier_keeps_runs_no_cheaper_run_beats():
  pts = [(3.0, 80.0), (1.0, 70.0), (2.0, 65.0), (4.0, 79.0), (5.0, 90.0)]
  assert plots.frontier(pts) == [(1.0, 70.0), (3.0, 80.0), (5.0, 90.0)]
  assert plots.frontier([(1.0, 3.0), (2.0, 1.0), (3.0, 2.0)], higher_is_better=False) == [
      (1.0, 3.0), (2.0, 1.0)]


@pytest.mark.slow
def test_runner_skips_finished_runs_and_resumes_interrupted_ones(tmp_path, capsys):
  exp = run.load_experiment('experiments/vit_pareto.py:smoke')
  for arm in exp.arms:
    arm['overrides'].update(TINY)
  runs = run.expand(exp)
  assert [r.name for r in runs] == ['dense_tiny/seed_0', 'dense_tiny/seed_1',
                                    'soft_moe_tiny/seed_0', 'soft_moe_tiny/seed_1']
  root = str(tmp_path / 'sweep')
  calls = []

  def interrupt_first(exp, r, workdir):
    calls.append(r.name)
    run.execute_in_process(exp, r, workdir, stop_at_step=2 if r.name == runs[0].name else None)

  def plain(exp, r, workdir):
    calls.append(r.name)
    run.execute_in_process(exp, r, workdir)

  with mock_fashion_mnist(), persistent_xla_cache(str(tmp_path / 'xla')):
    assert set(run.run_all(exp, runs, root, interrupt_first).values()) == {'todo'}
    assert [run.state(r, root) for r in runs] == ['partial', 'done', 'done', 'done']
    assert '[4/4] start soft_moe_tiny/seed_1, about' in capsys.readouterr().out   # progress, ETA
    calls.clear()
    before = run.run_all(exp, runs, root, plain)
    assert before['dense_tiny/seed_0'] == 'partial' and calls == ['dense_tiny/seed_0']
    calls.clear()
    run.run_all(exp, runs, root, plain)
    assert calls == []

  resumed = json.load(open(os.path.join(runs[0].workdir(root), 'results.json')))
  assert resumed['steps'] == 4 and [e['step'] for e in resumed['eval_history']] == [4]
  assert resumed['config']['seed'] == 0
  other = json.load(open(os.path.join(runs[1].workdir(root), 'results.json')))
  assert other['config']['seed'] == 1 and other['train_loss'] != resumed['train_loss']
  rows = run.collect(exp, runs, root)
  assert [(r['arm'], r['seed']) for r in rows] == [('dense_tiny', 0), ('dense_tiny', 1),
                                                   ('soft_moe_tiny', 0), ('soft_moe_tiny', 1)]
  assert all(r['train_flops'] > 0 and 0 <= r['metric'] <= 1 for r in rows)
  summary = run.summarize(exp, rows)
  soft = summary['arms']['soft_moe_tiny']
  accs = [r['metric'] for r in rows if r['arm'] == 'soft_moe_tiny']
  assert soft['metric']['n'] == 2 and soft['metric']['mean'] == pytest.approx(np.mean(accs))
  assert soft['metric']['sd'] == pytest.approx(np.std(accs, ddof=1))
  (comparison,) = summary['comparisons']
  assert comparison['a'] == 'soft_moe_tiny' and comparison['n'] == 2
  summary_path, plot_path = run.write_outputs(exp, summary, summary_path=str(tmp_path / 's.json'),
                                              plot_path=str(tmp_path / 'pareto.png'))
  plot_pareto.main([summary_path, f'--out={tmp_path / "again.png"}'])
  plot_curves.main([runs[2].workdir(root), f'--out={tmp_path / "curves.png"}'])
  for png in ('pareto.png', 'again.png', 'curves.png'):
    assert (tmp_path / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

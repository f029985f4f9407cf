"""Pareto sweep runner (skip finished, resume interrupted) and the plotting scripts."""
import json
import os

import pytest

from experiments import vit_pareto
from scripts import plot_curves, plot_pareto
from tests.train.vit_helpers import mock_fashion_mnist, persistent_xla_cache

TINY = {'model.width': 16, 'model.mlp_dim': 32, 'model.num_heads': 2, 'model.moe.num_experts': 4,
        'model.depth': 1, 'batch_size': 8, 'eval_batch_size': 16, 'count_flops': True}


def test_cpu_sweep_compares_five_methods_at_two_sizes():
  runs = vit_pareto.sweep_runs('cpu')
  assert len(runs) == 10 and len({r.name for r in runs}) == 10
  assert {r.method for r in runs} == set(vit_pareto.METHODS) and {r.size for r in runs} == {'tiny', 'small'}
  k2 = next(r for r in runs if r.name == 'tokens_choice_k2_small')
  assert k2.router == 'tokens_choice' and k2.overrides['model.moe.router_kwargs.k'] == 2
  config = vit_pareto.load_config(k2)
  assert config.model.moe.router_kwargs.k == 2 and config.model.size == 'small'
  with pytest.raises(ValueError, match='unknown sweep'):
    vit_pareto.sweep_runs('nope')


def test_frontier_keeps_runs_no_cheaper_run_beats():
  pts = [(3.0, 80.0), (1.0, 70.0), (2.0, 65.0), (4.0, 79.0), (5.0, 90.0)]
  assert plot_pareto.frontier(pts) == [(1.0, 70.0), (3.0, 80.0), (5.0, 90.0)]


@pytest.mark.slow
def test_sweep_skips_finished_runs_and_resumes_interrupted_ones(tmp_path):
  runs = vit_pareto.sweep_runs('smoke', extra_overrides=TINY)
  root = str(tmp_path / 'sweep')
  calls = []

  def interrupt_first(run, workdir):
    calls.append(run.name)
    vit_pareto.execute_in_process(run, workdir, stop_at_step=2 if run.name == runs[0].name else None)

  def plain(run, workdir):
    calls.append(run.name)
    vit_pareto.execute_in_process(run, workdir)

  with mock_fashion_mnist(), persistent_xla_cache(str(tmp_path / 'xla')):
    assert vit_pareto.run_sweep(runs, root, interrupt_first) == {'dense_tiny': 'todo', 'soft_moe_tiny': 'todo'}
    assert [vit_pareto.state(r, root) for r in runs] == ['partial', 'done']
    calls.clear()
    assert vit_pareto.run_sweep(runs, root, plain) == {'dense_tiny': 'partial', 'soft_moe_tiny': 'done'}
    assert calls == ['dense_tiny']
    calls.clear()
    vit_pareto.run_sweep(runs, root, plain)
    assert calls == []

  resumed = json.load(open(os.path.join(root, 'dense_tiny', 'results.json')))
  assert resumed['steps'] == 4 and [e['step'] for e in resumed['eval_history']] == [4]
  rows = vit_pareto.collect(runs, root)
  assert [r['name'] for r in rows] == ['dense_tiny', 'soft_moe_tiny']
  assert all(r['train_flops'] > 0 and 0 <= r['test_accuracy'] <= 1 for r in rows)
  flops = json.load(open(os.path.join(root, 'soft_moe_tiny', 'results.json')))['train_flops']
  assert flops['total'] == pytest.approx(4 * flops['per_step']) and flops['moe_layers']
  summary = tmp_path / 'summary.json'
  summary.write_text(json.dumps(rows))
  plot_pareto.main([str(summary), f'--out={tmp_path / "pareto.png"}'])
  plot_curves.main([os.path.join(root, 'soft_moe_tiny'), f'--out={tmp_path / "curves.png"}'])
  for png in ('pareto.png', 'curves.png'):
    assert (tmp_path / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

"""Runner features without training: comparison forms and their statistics, '{root}'
overrides, shared roots, the run lock, diverged runs, prepare hooks, extra evaluations,
arm recipes, cost-estimate schedules."""
import fcntl
import json
import os

import ml_collections
import numpy as np
import pytest

from moe_jax.experiments import arm_config, estimate, run, stats, summary

EXPERIMENT = '''
import ml_collections
def get_config(variant=None):
  c = ml_collections.ConfigDict()
  c.name = 'fake'
  c.config_file = 'configs/t5/causal_lm.py'
  c.seeds = (0, 1, 2)
  c.metric = 'neg_log_perplexity'
  c.arms = [dict(name='a', config_arg='switch,tiny', overrides={'num_train_steps': 10}),
            dict(name='b', config_arg='experts_choice,tiny',
                 overrides={'model.moe.allow_future_leak': True,
                            'model.moe.router_kwargs.eval_rule': 'token_top_k',
                            'model.moe.layers': (1,), 'model.moe.every': None,
                            'data.cache_dir': '{root}/cache'})]
  c.derived = [dict(name='loss', fn='value', kwargs=dict(key='final.validation_loss'),
                    higher_is_better=False)]
  c.evals = [dict(name='causal', arms=['b'], overrides={'x': 1})]
  c.comparisons = [('a', 'b'), ('a', 'b', 'loss'),
                   dict(a='b', b='b', metric='metric', metric_b='evals.causal.neg_log_perplexity',
                        name_a='b (train rule)', name_b='b (causal rule)')]
  c.prepare = []
  return c
'''


@pytest.fixture
def fake(tmp_path):
  path = tmp_path / 'fake.py'
  path.write_text(EXPERIMENT)
  return str(path)


def _row(arm, seed, nlp, loss=None, causal=None):
  return dict(arm=arm, seed=seed, group=arm, label='', x=None, metric=nlp,
              final={'neg_log_perplexity': nlp, 'validation_loss': -nlp if loss is None else loss},
              evals={'causal': None if causal is None else {'neg_log_perplexity': causal}},
              train_flops=1.0, train_time_s=10.0 + seed, process_cpu_s=20.0, step_time_s=0.1,
              steps_per_sec=10.0, curve=[], train_loss=[])


def test_comparisons_on_metrics_derived_values_and_two_metrics_of_one_arm(fake):
  exp = run.load_experiment(fake)
  rows = [_row('a', s, -4.0 + 0.01 * s) for s in range(3)]
  rows += [_row('b', s, -4.1 + 0.02 * s, causal=-4.3 + 0.01 * s) for s in range(3)]
  from moe_jax.experiments import derived
  derived.compute(exp.derived, rows)
  out = summary.summarize(exp, rows)
  plain, by_loss, leak = out['comparisons']
  d = np.array([0.1 - 0.01 * s for s in range(3)])
  want = stats.paired_difference('a', 'b', {s: -4.0 + 0.01 * s for s in range(3)},
                                 {s: -4.1 + 0.02 * s for s in range(3)})
  assert plain['mean'] == pytest.approx(d.mean()) and plain['low'] == pytest.approx(want.low)
  assert plain['verdict'] == 'a better than b'
  # loss = -metric: the same difference, negated, and lower is better: the same verdict.
  assert by_loss['mean'] == pytest.approx(-d.mean()) and by_loss['higher_is_better'] is False
  assert by_loss['verdict'] == 'a better than b'
  assert leak['a'] == 'b (train rule)' and leak['mean'] == pytest.approx(0.2 + 0.01)
  assert leak['verdict'] == 'b (train rule) better than b (causal rule)'
  arm_b = out['arms']['b']
  assert arm_b['evals']['causal']['neg_log_perplexity']['n'] == 3
  assert arm_b['train_time_s']['mean'] == pytest.approx(11.0) and arm_b['derived']['loss']['n'] == 3


def test_load_experiment_rejects_unknown_metrics_and_eval_arms(fake, tmp_path):
  for bad, match in ((("('a', 'b', 'loss')", "('a', 'b', 'nope')"), 'unknown metric'),
                     (("arms=['b']", "arms=['zz']"), 'unknown arms')):
    path = tmp_path / 'bad.py'
    path.write_text(EXPERIMENT.replace(*bad))
    with pytest.raises(ValueError, match=match):
      run.load_experiment(str(path))


def test_root_placeholder_recipe_and_arm_config_keep_types_and_new_keys(fake, tmp_path):
  exp = run.load_experiment(fake)
  assert exp.root == 'workdirs/fake'
  root = str(tmp_path / 'root')
  b0 = run.expand(exp, root)[3]
  assert dict(b0.overrides)['data.cache_dir'] == os.path.abspath(root) + '/cache'
  recipe = run.arm_config_file(b0, root)
  assert recipe == os.path.join(os.path.abspath(root), 'b', 'seed_0.config')
  config = arm_config.get_config(recipe)
  assert config.model.moe.router_kwargs.eval_rule == 'token_top_k'     # a key the file lacks
  assert config.model.moe.layers == (1,) and config.seed == 0
  assert config.to_json_best_effort() == run.run_config(exp, b0).to_json_best_effort()


def test_shared_root_refuses_a_finished_run_with_another_config(fake, tmp_path):
  exp = run.load_experiment(fake)
  root = str(tmp_path / 'root')
  a0 = run.expand(exp, root)[0]
  os.makedirs(a0.workdir(root))
  config = json.loads(run.run_config(exp, a0).to_json_best_effort())
  with open(os.path.join(a0.workdir(root), 'results.json'), 'w') as f:
    json.dump({'config': config}, f)
  run.check_shared(exp, [a0], root)                       # the same config: reused
  config['num_train_steps'] = 99
  with open(os.path.join(a0.workdir(root), 'results.json'), 'w') as f:
    json.dump({'config': config}, f)
  with pytest.raises(ValueError, match='num_train_steps: 99 in the workdir, 10 in the arm'):
    run.check_shared(exp, [a0], root)


def test_lock_is_exclusive_while_a_run_holds_it(tmp_path):
  lock = str(tmp_path / 'cpu.lock')
  with run.locked(lock):
    with open(lock) as other:
      with pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
  with open(lock) as other:
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)        # released afterwards
  with run.locked(None):
    pass


def test_diverged_runs_are_recorded_not_rerun_and_counted(fake, tmp_path):
  exp = run.load_experiment(fake)
  exp.evals = []
  root = str(tmp_path / 'root')
  runs = run.expand(exp, root)[:2]
  calls = []

  def diverge(exp, r, workdir):
    calls.append(r.name)
    raise run.Diverged(f'{r.name} diverged at step 3')

  lock = str(tmp_path / 'lock')
  run.run_all(exp, runs, root, diverge, lock=lock)
  assert [run.state(r, root) for r in runs] == ['diverged'] * 2 and len(calls) == 2
  info = json.load(open(os.path.join(runs[0].workdir(root), 'run_info.json')))
  assert info['diverged'] == 'a/seed_0 diverged at step 3' and len(info['loadavg']) == 2
  assert info['sessions'][0]['lock'] == lock
  run.run_all(exp, runs, root, diverge)
  assert len(calls) == 2                                        # not rerun
  rows = summary.collect(exp, runs, root)
  assert [r['diverged'] for r in rows] == ['a/seed_0 diverged at step 3', 'a/seed_1 diverged at step 3']
  from moe_jax.experiments import derived
  assert derived.loss_spike(rows[0], {}) == 1.0
  assert summary.summarize(exp, rows)['arms']['a']['diverged'] == 2


def test_prepare_hooks_and_extra_evaluations_run_once(fake, tmp_path, monkeypatch):
  exp = run.load_experiment(fake)
  log = str(tmp_path / 'hook.log')
  exp.prepare = [dict(fn='tests.experiments.test_runner_features:_hook', kwargs=dict(log=log))]
  root = str(tmp_path / 'root')
  runs = run.expand(exp, root)
  trained, evaluated = [], []

  def train(exp, r, workdir):
    trained.append(r.name)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump({'config': json.loads(run.run_config(exp, r).to_json_best_effort())}, f)

  def evaluate(workdir, name, overrides):
    evaluated.append((os.path.relpath(workdir, root), name, overrides))
    os.makedirs(os.path.join(workdir, 'evals'))
    with open(os.path.join(workdir, 'evals', f'{name}.json'), 'w') as f:
      json.dump({'final': {}}, f)

  run.run_all(exp, runs, root, train, execute_eval=evaluate)
  assert open(log).read().splitlines() == [f'{root} 6']
  assert len(trained) == 6
  assert evaluated == [(f'b/seed_{s}', 'causal', {'x': 1}) for s in range(3)]   # arms=['b']
  run.run_all(exp, runs, root, train, execute_eval=evaluate)
  assert len(trained) == 6 and len(evaluated) == 3 and len(open(log).read().splitlines()) == 2


def _hook(*, exp, root, runs, train, log):
  with open(log, 'a') as f:
    f.write(f'{root} {len(runs)}\n')


def test_estimate_runs_each_arm_briefly_with_as_many_evaluations(fake):
  exp = run.load_experiment(fake)
  exp.arms[0]['overrides'].update(num_train_steps=1200, eval_every_steps=100)
  short, real = estimate.shortened(exp, 60)
  assert short.seeds == (0,) and real['a'] == (1200, 12) and real['b'][0] == 1500
  a = short.arms[0]['overrides']
  assert a['num_train_steps'] == 60 and a['eval_every_steps'] == 5
  assert a['optimizer.warmup_steps'] == 30 and a['checkpoint_every_steps'] == 60
  assert exp.arms[0]['overrides']['num_train_steps'] == 1200       # the experiment is untouched
  assert isinstance(short, ml_collections.ConfigDict)


def test_estimate_record_merges_arms_measured_separately(tmp_path):
  path = str(tmp_path / 'est' / 'x.json')
  estimate.record(dict(experiment='x', steps=60, arms={'a': dict(arm_s=10.0)}), path)
  rec = estimate.record(dict(experiment='x', steps=100, arms={'b': dict(arm_s=5.0),
                                                               'c': dict(diverged='nan')}), path)
  assert rec['arms'] == {'a': dict(arm_s=10.0, steps=60), 'b': dict(arm_s=5.0, steps=100),
                         'c': dict(diverged='nan', steps=100)}
  assert rec['measured_total_s'] == 15.0

r"""Runs an experiment config: every arm with every seed, then the summary and the plot.

    python -m moe_jax.experiments.run --experiment=experiments/vit_pareto.py:cpu
    python -m moe_jax.experiments.run --experiment=experiments/vit_pareto.py:cpu --dry_run

An experiment config (`get_config(variant)` in a file under experiments/) is an
ml_collections ConfigDict:

    name           'vit_pareto_cpu' (workdirs/<name>/<arm>/seed_<s>, unless --root)
    config_file    the run config file every arm uses, e.g. 'configs/vit/fashion_mnist.py'
    seeds          (0, 1, 2): every arm runs with each (`config.seed`), so arms are paired
    arms           [dict(name, config_arg, overrides={dotted key: value}, group, label)]
    comparisons    [(arm A, arm B), ...]: paired differences and verdicts (stats.py)
    metric         key of results['final'] ('test_accuracy'); higher_is_better, metric_label,
                   metric_scale (100: plot percent)
    cost_axes      results keys plotted against ('train_flops', 'train_time_s', 'process_cpu_s')
    summary, plot  output paths (JSON, PNG); title

A run with results.json is skipped, one with checkpoints resumes where it stopped (rerun
the same command after an interruption). Runs execute one at a time in a subprocess
(`python -m moe_jax.train.main`), so their times do not compete; progress prints runs
done out of total with an estimated time left.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Callable

import ml_collections

from moe_jax.experiments import plots, stats
from moe_jax.train import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COST_AXES = ('train_flops', 'train_time_s', 'process_cpu_s')


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: an arm of the experiment with one seed."""
  arm: str
  seed: int
  config_arg: str
  overrides: tuple[tuple[str, object], ...]
  group: str = ''
  label: str = ''

  @property
  def name(self) -> str:
    return f'{self.arm}/seed_{self.seed}'

  def workdir(self, root: str) -> str:
    return os.path.join(root, self.arm, f'seed_{self.seed}')

  def all_overrides(self) -> dict:
    return {**dict(self.overrides), 'seed': self.seed}


def resolve(path: str) -> str:
  """A path as given (absolute or from the working directory), else from the repository."""
  return path if os.path.exists(path) else os.path.join(ROOT, path)


def load_experiment(spec: str) -> ml_collections.ConfigDict:
  """'experiments/vit_pareto.py:cpu' -> the experiment ConfigDict (defaults filled in)."""
  path, _, variant = spec.partition(':')
  module = config_lib.load_config_module(resolve(path))
  exp = module.get_config(variant or None)
  defaults = dict(seeds=(0, 1, 2), comparisons=[], metric='test_accuracy', higher_is_better=True,
                  metric_label=None, metric_scale=1.0, cost_axes=COST_AXES, title=exp.name,
                  summary=f'experiments/results/{exp.name}.json',
                  plot=f'experiments/plots/{exp.name}.png')
  for k, v in defaults.items():
    if k not in exp:
      exp[k] = v
  names = [a['name'] for a in exp.arms]
  if len(set(names)) != len(names):
    raise ValueError(f'experiment {exp.name}: arm names repeat: {names}.')
  for a, b in exp.comparisons:
    for arm in (a, b):
      if arm not in names:
        raise ValueError(f'experiment {exp.name}: comparison ({a}, {b}) names unknown arm '
                         f'{arm!r}; arms: {names}.')
  return exp


def expand(exp: ml_collections.ConfigDict) -> list[Run]:
  """Every (arm, seed) of the experiment, arm-major (all seeds of an arm run together)."""
  return [Run(arm=a['name'], seed=int(s), config_arg=a['config_arg'],
              overrides=tuple(sorted(dict(a.get('overrides') or {}).items())),
              group=a.get('group', a['name']), label=a.get('label', ''))
          for a in exp.arms for s in exp.seeds]


def state(run: Run, root: str) -> str:
  """'done' (results.json), 'partial' (checkpoints only) or 'todo'."""
  wd = run.workdir(root)
  if os.path.exists(os.path.join(wd, 'results.json')):
    return 'done'
  ckpt = os.path.join(wd, 'checkpoints')
  return 'partial' if os.path.isdir(ckpt) and os.listdir(ckpt) else 'todo'


def run_config(exp: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
  """The run's ConfigDict: the config file's get_config(arg) plus the run's overrides."""
  module = config_lib.load_config_module(resolve(exp.config_file))
  return config_lib.apply_overrides(module.get_config(run.config_arg), run.all_overrides())


def execute_subprocess(exp: ml_collections.ConfigDict, run: Run, workdir: str) -> None:
  """Trains one run with the command-line entry point (resumes if workdir has checkpoints)."""
  cmd = [sys.executable, '-m', 'moe_jax.train.main',
         f'--config={resolve(exp.config_file)}:{run.config_arg}', f'--workdir={workdir}']
  cmd += [f'--config.{k}={v}' for k, v in run.all_overrides().items()]
  print('+', ' '.join(cmd), flush=True)
  subprocess.run(cmd, check=True)


def execute_in_process(exp: ml_collections.ConfigDict, run: Run, workdir: str, *,
                       stop_at_step: int | None = None) -> None:
  """Trains one run in this process (notebooks, tests)."""
  from moe_jax.train.trainer import train_and_evaluate
  train_and_evaluate(run_config(exp, run), workdir, stop_at_step=stop_at_step)


def run_all(exp: ml_collections.ConfigDict, runs: list[Run], root: str,
            execute: Callable = execute_subprocess) -> dict[str, str]:
  """Runs every unfinished run in order; returns {run name: state before this call}."""
  before = {r.name: state(r, root) for r in runs}
  todo = [r for r in runs if before[r.name] != 'done']
  print(f'{exp.name}: {len(runs) - len(todo)} of {len(runs)} runs done, {len(todo)} to run',
        flush=True)
  spent = 0.0
  for i, run in enumerate(todo):
    eta = '' if not i else f', about {_duration(spent / i * (len(todo) - i))} left'
    print(f'[{len(runs) - len(todo) + i + 1}/{len(runs)}] '
          f'{"resume" if before[run.name] == "partial" else "start"} {run.name}{eta}', flush=True)
    t0 = time.time()
    execute(exp, run, run.workdir(root))
    spent += time.time() - t0
  if todo:
    print(f'{exp.name}: {len(runs)} of {len(runs)} runs done ({len(todo)} run now in '
          f'{_duration(spent)})', flush=True)
  return before


def _duration(seconds: float) -> str:
  m = int(seconds // 60)
  return f'{m // 60} h {m % 60:02d} min' if m >= 60 else f'{m} min {int(seconds % 60):02d} s'


def collect(exp: ml_collections.ConfigDict, runs: list[Run], root: str) -> list[dict]:
  """One row per finished run: its metric, costs and identity."""
  rows = []
  for run in runs:
    path = os.path.join(run.workdir(root), 'results.json')
    if not os.path.exists(path):
      continue
    with open(path) as f:
      r = json.load(f)
    rows.append(dict(arm=run.arm, seed=run.seed, group=run.group, label=run.label,
                     final=r['final'], metric=r['final'][exp.metric],
                     train_flops=(r.get('train_flops') or {}).get('total'),
                     train_time_s=r['train_time_s'], wall_time_s=r['wall_time_s'],
                     process_cpu_s=r.get('process_cpu_s'), steps=r['steps'],
                     params_total=r['params']['total'], params_active=r['params']['active'],
                     environment=r['environment']))
  return rows


def summarize(exp: ml_collections.ConfigDict, rows: list[dict]) -> dict:
  """Per-arm mean ± sd of the metric and costs; paired differences with verdicts."""
  arms = {}
  for a in exp.arms:
    mine = [r for r in rows if r['arm'] == a['name']]
    entry = dict(group=a.get('group', a['name']), label=a.get('label', ''),
                 seeds=[r['seed'] for r in mine],
                 metric=dataclasses.asdict(stats.Summary.of(r['metric'] for r in mine)))
    for cost in exp.cost_axes:
      entry[cost] = dataclasses.asdict(stats.Summary.of(r.get(cost) for r in mine))
    arms[a['name']] = entry
  comparisons = []
  for a, b in exp.comparisons:
    by_seed = lambda arm: {r['seed']: r['metric'] for r in rows if r['arm'] == arm}
    d = stats.paired_difference(a, b, by_seed(a), by_seed(b))
    comparisons.append(dict(dataclasses.asdict(d),
                            verdict=stats.verdict(d, higher_is_better=exp.higher_is_better)))
  return dict(experiment=exp.name, config_file=exp.config_file, metric=exp.metric,
              metric_label=exp.metric_label or exp.metric, metric_scale=exp.metric_scale,
              higher_is_better=exp.higher_is_better, seeds=list(exp.seeds),
              cost_axes=list(exp.cost_axes), title=exp.title, arms=arms,
              comparisons=comparisons, runs=rows)


def write_outputs(exp: ml_collections.ConfigDict, summary: dict, *, summary_path: str | None = None,
                  plot_path: str | None = None) -> tuple[str, str]:
  summary_path = summary_path or os.path.join(ROOT, exp.summary)
  plot_path = plot_path or os.path.join(ROOT, exp.plot)
  os.makedirs(os.path.dirname(summary_path), exist_ok=True)
  with open(summary_path, 'w') as f:
    json.dump(summary, f, indent=1)
  plots.pareto_plot(summary, plot_path)
  return summary_path, plot_path


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--experiment', required=True, help='experiments/<name>.py[:variant]')
  p.add_argument('--root', default=None, help='run workdirs (default workdirs/<experiment name>)')
  p.add_argument('--summary', default=None, help='summary JSON (default: the config\'s)')
  p.add_argument('--plot', default=None, help='plot PNG (default: the config\'s)')
  p.add_argument('--dry_run', action='store_true', help='list the runs and their state only')
  args = p.parse_args(argv)
  exp = load_experiment(args.experiment)
  runs = expand(exp)
  root = args.root or os.path.join('workdirs', exp.name)
  if args.dry_run:
    for run in runs:
      print(f'{state(run, root):8s} {run.name:32s} {run.config_arg} {dict(run.overrides)}')
    return
  run_all(exp, runs, root)
  summary = summarize(exp, collect(exp, runs, root))
  summary_path, plot_path = write_outputs(exp, summary, summary_path=args.summary,
                                          plot_path=args.plot)
  for c in summary['comparisons']:
    print(f"{c['a']} - {c['b']}: {c['mean']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] "
          f"(n={c['n']}): {c['verdict']}")
  print(f'summary {summary_path}\nplot {plot_path}')


if __name__ == '__main__':
  main()

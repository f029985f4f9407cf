r"""Runs an experiment config: every arm with every seed, then the summary and the plots.

    python -m moe_jax.experiments.run --experiment=experiments/vit_pareto.py:cpu
    python -m moe_jax.experiments.run --experiment=experiments/vit_pareto.py:cpu --dry_run
    python -m moe_jax.experiments.run --experiment=... --lock=/tmp/cpu.lock   # timed alone
    python -m moe_jax.experiments.run --experiment=... --estimate=60          # cost, measured
    python -m moe_jax.experiments.run --experiment=... --summarize_only

An experiment config (`get_config(variant)` in a file under experiments/) is an
ml_collections ConfigDict:

    name           'vit_pareto_cpu'
    root           workdir root of its runs (default workdirs/<name>): runs live in
                   <root>/<arm>/seed_<s>. Experiments that share a root share the runs of
                   identically named arms (a finished run whose config differs from the
                   arm's is an error, never silently reused).
    config_file    the run config file every arm uses ('configs/vit/fashion_mnist.py');
                   an arm may name its own (`config_file` in the arm)
    seeds          (0, 1, 2): every arm runs with each (`config.seed`), so arms are paired
    arms           [dict(name, config_arg, overrides={dotted key: value}, group, label,
                   x)]: `x` is the arm's position in a sweep plot (e.g. its expert count);
                   '{root}' in a string override becomes the root (files `prepare` made)
    comparisons    [(A, B) or (A, B, metric)]: paired differences A − B and verdicts
                   (stats.py) of the headline metric or of any cost / derived metric
    metric         key of results['final'] ('test_accuracy'); higher_is_better,
                   metric_label, metric_scale (100: plot percent); curve_key (the
                   eval-history key of the metric; found by value when unset)
    cost_axes      quantities plotted against ('train_flops', 'train_time_s', 'process_cpu_s')
    derived        [dict(name, fn, kwargs, higher_is_better, label)]: per-run metrics
                   computed from the results (`derived.py`: steps to a reference's final
                   quality, differences, ratios, loss spikes, eval routing metrics)
    evals          [dict(name, overrides, arms=None)]: each finished run of those arms
                   (all when None) is evaluated again from its final checkpoint with the
                   config overrides (`evals.py`), e.g. another routing rule; their final
                   metrics read as 'evals.<name>.<key>'
    prepare        [dict(fn='module:function', kwargs)]: run before the arms, e.g. hash
                   tables built from data (`hash_tables.py`); each gets (exp, root, runs,
                   train) and must skip work already done
    sweep          dict(x_label, panels=[quantities]): a second plot, each quantity against
                   the arms' `x`, one line per group (e.g. accuracy and step time against
                   the number of experts)
    notes, claims  the tuning budget and what the comparison reproduces (copied to the
                   summary; `reproductions.py` turns claims into the README table)
    summary, plot  output paths (JSON, PNG); title

A finished run is skipped, an interrupted one resumes where it stopped (rerun the same
command after an interruption); a run that diverged (exit status 3) is recorded as such
and not rerun. Runs execute one at a time in a subprocess (`python -m
moe_jax.train.main` with `arm_config.py`), so their times do not compete; with
`--lock=PATH` each holds an exclusive `flock` on PATH while it trains (other jobs that
take the same lock wait), and each run's load average before and after is recorded in
<workdir>/run_info.json and in the summary.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import importlib
import json
import os
import subprocess
import sys
import time
from typing import Callable

import ml_collections

from moe_jax.experiments import evals as evals_lib
from moe_jax.experiments import plots, summary as summary_lib
from moe_jax.experiments.summary import collect, summarize  # noqa: F401 (public API)
from moe_jax.train import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COST_AXES = ('train_flops', 'train_time_s', 'process_cpu_s')
ARM_CONFIG = os.path.join(ROOT, 'moe_jax', 'experiments', 'arm_config.py')
EXIT_DIVERGED, EXIT_STOPPED = 3, 75


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: an arm of the experiment with one seed."""
  arm: str
  seed: int
  config_arg: str
  overrides: tuple[tuple[str, object], ...]
  group: str = ''
  label: str = ''
  config_file: str = ''
  x: float | None = None

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
                  root=os.path.join('workdirs', exp.name),
                  summary=f'experiments/results/{exp.name}.json',
                  plot=f'experiments/plots/{exp.name}.png')
  for k, v in defaults.items():
    if k not in exp:
      exp[k] = v
  names = [a['name'] for a in exp.arms]
  if len(set(names)) != len(names):
    raise ValueError(f'experiment {exp.name}: arm names repeat: {names}.')
  metrics = {'metric', *summary_lib.COSTS, *(d['name'] for d in exp.get('derived', []))}
  for c in exp.comparisons:
    spec = summary_lib.comparison_spec(c)
    for arm in (spec['a'], spec['b']):
      if arm not in names:
        raise ValueError(f'experiment {exp.name}: comparison {c} names unknown arm '
                         f'{arm!r}; arms: {names}.')
    for m in (spec['metric'], spec['metric_b']):
      if m not in metrics and not m.startswith(('final.', 'evals.')):
        raise ValueError(f'experiment {exp.name}: comparison {c} names unknown metric '
                         f'{m!r}; known: {sorted(metrics)}, final.<key>, evals.<name>.<key>.')
  for e in exp.get('evals', []):
    unknown = set(e.get('arms') or []) - set(names)
    if unknown:
      raise ValueError(f"experiment {exp.name}: eval {e['name']!r} names unknown arms "
                       f'{sorted(unknown)}.')
  return exp


def _substitute(value, root: str | None):
  if root is not None and isinstance(value, str) and '{root}' in value:
    return value.replace('{root}', os.path.abspath(root))
  return value


def expand(exp: ml_collections.ConfigDict, root: str | None = None) -> list[Run]:
  """Every (arm, seed) of the experiment, arm-major (all seeds of an arm run together);
  '{root}' in string overrides becomes `root` (absolute) when given."""
  return [Run(arm=a['name'], seed=int(s), config_arg=a['config_arg'],
              overrides=tuple(sorted((k, _substitute(v, root))
                                     for k, v in dict(a.get('overrides') or {}).items())),
              group=a.get('group', a['name']), label=a.get('label', ''),
              config_file=a.get('config_file') or exp.config_file, x=a.get('x'))
          for a in exp.arms for s in exp.seeds]


def run_config(exp: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
  """The run's ConfigDict: the config file's get_config(arg) plus the run's overrides."""
  return config_for(run.config_file or exp.config_file, run.config_arg, run.all_overrides())


def config_for(config_file: str, config_arg: str, overrides: dict) -> ml_collections.ConfigDict:
  module = config_lib.load_config_module(resolve(config_file))
  return config_lib.apply_overrides(module.get_config(config_arg), overrides)


def _config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def state(run: Run, root: str) -> str:
  """'done' (results.json), 'diverged' (stopped on a non-finite loss), 'partial'
  (checkpoints only) or 'todo'."""
  wd = run.workdir(root)
  if os.path.exists(os.path.join(wd, 'results.json')):
    return 'done'
  info = os.path.join(wd, summary_lib.RUN_INFO)
  if os.path.exists(info):
    with open(info) as f:
      if json.load(f).get('diverged'):
        return 'diverged'
  ckpt = os.path.join(wd, 'checkpoints')
  return 'partial' if os.path.isdir(ckpt) and os.listdir(ckpt) else 'todo'


def check_shared(exp: ml_collections.ConfigDict, runs: list[Run], root: str) -> None:
  """ValueError if a finished run in `root` holds another config than its arm's (another
  experiment sharing the root defined an arm of the same name differently)."""
  for run in runs:
    path = os.path.join(run.workdir(root), 'results.json')
    if not os.path.exists(path):
      continue
    with open(path) as f:
      have = json.load(f)['config']
    want = _config_json(run_config(exp, run))
    if have != want:
      diff = sorted(_diff(have, want))
      raise ValueError(f'{run.workdir(root)} holds a finished run whose config differs from arm '
                       f'{run.arm!r} of {exp.name}: {diff[:5]}. Rename the arm or use another '
                       'root.')


def _diff(a, b, prefix=''):
  if isinstance(a, dict) and isinstance(b, dict):
    for k in set(a) | set(b):
      yield from _diff(a.get(k), b.get(k), f'{prefix}{k}.')
  elif a != b:
    yield f'{prefix[:-1]}: {a!r} in the workdir, {b!r} in the arm'


# --- executing runs ------------------------------------------------------------------------

class Diverged(Exception):
  """The run stopped on a non-finite loss (trainer exit status 3)."""


def arm_config_file(run: Run, root: str) -> str:
  """Writes the run's config recipe beside its workdir (<root>/<arm>/seed_<s>.config, a
  Python literal that `arm_config.py` reads) and returns its path."""
  path = os.path.abspath(os.path.join(root, run.arm, f'seed_{run.seed}.config'))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(repr(dict(config_file=os.path.abspath(resolve(run.config_file)),
                      config_arg=run.config_arg, overrides=run.all_overrides())) + '\n')
  return path


def execute_subprocess(exp: ml_collections.ConfigDict, run: Run, workdir: str) -> None:
  """Trains one run with the command-line entry point (resumes if workdir has checkpoints)."""
  recipe = arm_config_file(run, os.path.dirname(os.path.dirname(workdir)))
  cmd = [sys.executable, '-m', 'moe_jax.train.main', f'--config={ARM_CONFIG}:{recipe}',
         f'--workdir={workdir}']
  print('+', ' '.join(cmd), flush=True)
  print('  (= --config=' + resolve(run.config_file) + ':' + run.config_arg + ' ' +
        ' '.join(f'--config.{k}={v}' for k, v in run.all_overrides().items()) + ')', flush=True)
  status = subprocess.run(cmd).returncode
  if status == EXIT_DIVERGED:
    raise Diverged(f'{run.name} diverged (exit status 3)')
  if status == EXIT_STOPPED:
    raise KeyboardInterrupt(f'{run.name} was stopped; rerun to resume')
  if status:
    raise subprocess.CalledProcessError(status, cmd)


def execute_in_process(exp: ml_collections.ConfigDict, run: Run, workdir: str, *,
                       stop_at_step: int | None = None) -> None:
  """Trains one run in this process (notebooks, tests)."""
  from moe_jax.train.divergence import DivergenceError
  from moe_jax.train.trainer import train_and_evaluate
  try:
    train_and_evaluate(run_config(exp, run), workdir, stop_at_step=stop_at_step)
  except DivergenceError as e:
    raise Diverged(str(e)) from None


@contextlib.contextmanager
def locked(path: str | None):
  """An exclusive flock on `path` (created if missing) for the duration; no-op for None."""
  if not path:
    yield
    return
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _update_info(workdir: str, change: Callable[[dict], None]) -> None:
  """Applies `change` to <workdir>/run_info.json (created if missing)."""
  path = os.path.join(workdir, summary_lib.RUN_INFO)
  info = {}
  if os.path.exists(path):
    with open(path) as f:
      info = json.load(f)
  change(info)
  os.makedirs(workdir, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(info, f, indent=1)


def _record(workdir: str, session: dict, **fields) -> None:
  def change(info):
    info.setdefault('sessions', []).append(session)
    info['loadavg'] = [session['loadavg_start'], session['loadavg_end']]
    info.update(fields)
  _update_info(workdir, change)


def run_one(exp, run: Run, root: str, execute: Callable, *, lock: str | None = None,
            execute_eval: Callable | None = None) -> str:
  """Trains `run` unless finished (under `lock`), records run_info.json, then its extra
  evaluations; returns its state afterwards."""
  wd = run.workdir(root)
  if state(run, root) in ('todo', 'partial'):
    with locked(lock):
      start, load0 = time.time(), os.getloadavg()[0]
      status = 'done'
      try:
        execute(exp, run, wd)
      except Diverged as e:
        status = str(e)
      finally:
        session = dict(start=start, wall_s=time.time() - start, loadavg_start=load0,
                       loadavg_end=os.getloadavg()[0], lock=lock)
      _record(wd, session, **({} if status == 'done' else {'diverged': status}))
  if state(run, root) == 'done':
    for spec in exp.get('evals', []):
      if spec.get('arms') and run.arm not in spec['arms']:
        continue
      if not os.path.exists(evals_lib.output_path(wd, spec['name'])):
        with locked(lock):
          t0 = time.time()
          (execute_eval or evals_lib.execute_subprocess)(wd, spec['name'],
                                                         dict(spec.get('overrides') or {}))
          _update_info(wd, lambda info: info.setdefault('evals_wall_s', {}).update(
              {spec['name']: time.time() - t0}))
  return state(run, root)


def prepare(exp, runs: list[Run], root: str, train: Callable[[Run], str]) -> None:
  """Calls every `exp.prepare` hook ('module:function', kwargs) in order."""
  for p in exp.get('prepare', []):
    module, _, fn = p['fn'].partition(':')
    getattr(importlib.import_module(module), fn)(exp=exp, root=root, runs=runs, train=train,
                                                 **dict(p.get('kwargs') or {}))


def run_all(exp: ml_collections.ConfigDict, runs: list[Run], root: str,
            execute: Callable = execute_subprocess, *, lock: str | None = None,
            execute_eval: Callable | None = None) -> dict[str, str]:
  """Prepares, then runs every unfinished run in order; returns {run name: state before}."""
  before = {r.name: state(r, root) for r in runs}
  check_shared(exp, runs, root)
  train = lambda r: run_one(exp, r, root, execute, lock=lock, execute_eval=execute_eval)
  prepare(exp, expand(exp, root), root, train)   # every arm, even when running a subset
  todo = [r for r in runs if state(r, root) not in ('done', 'diverged')]
  print(f'{exp.name}: {len(runs) - len(todo)} of {len(runs)} runs done, {len(todo)} to run',
        flush=True)
  spent = 0.0
  for i, run in enumerate(todo):
    eta = '' if not i else f', about {_duration(spent / i * (len(todo) - i))} left'
    print(f'[{len(runs) - len(todo) + i + 1}/{len(runs)}] '
          f'{"resume" if state(run, root) == "partial" else "start"} {run.name}{eta}', flush=True)
    t0 = time.time()
    train(run)
    spent += time.time() - t0
  for run in runs:               # extra evaluations of runs finished before this call
    if state(run, root) == 'done':
      train(run)
  return before


def _duration(seconds: float) -> str:
  m = int(seconds // 60)
  return f'{m // 60} h {m % 60:02d} min' if m >= 60 else f'{m} min {int(seconds % 60):02d} s'


def write_outputs(exp: ml_collections.ConfigDict, summary: dict, *, summary_path: str | None = None,
                  plot_path: str | None = None) -> tuple[str, str]:
  """Writes the summary JSON, the Pareto plot and (with `exp.sweep`) the sweep plot
  (<plot>_sweep.png); returns (summary path, plot path)."""
  summary_path = summary_path or os.path.join(ROOT, exp.summary)
  plot_path = plot_path or os.path.join(ROOT, exp.plot)
  os.makedirs(os.path.dirname(summary_path), exist_ok=True)
  with open(summary_path, 'w') as f:
    json.dump(summary, f, indent=1)
  plots.pareto_plot(summary, plot_path)
  if summary.get('sweep'):
    plots.sweep_plot(summary, plots.sweep_path(plot_path))
  return summary_path, plot_path


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--experiment', required=True, help='experiments/<name>.py[:variant]')
  p.add_argument('--root', default=None, help="run workdirs (default: the config's root, "
                 'workdirs/<experiment name>)')
  p.add_argument('--summary', default=None, help='summary JSON (default: the config\'s)')
  p.add_argument('--plot', default=None, help='plot PNG (default: the config\'s)')
  p.add_argument('--dry_run', action='store_true', help='list the runs and their state only')
  p.add_argument('--summarize_only', action='store_true',
                 help='summarise the finished runs without running anything')
  p.add_argument('--lock', default=None, help='hold an exclusive flock on this file while '
                 'each run trains (e.g. /tmp/cpu.lock: timings taken alone)')
  p.add_argument('--estimate', type=int, default=None, metavar='STEPS',
                 help='measure each arm for STEPS steps (seed 0) and print the estimated cost')
  p.add_argument('--only', default=None, help='comma-separated arms: run (or estimate) these '
                 'only; the summary still covers every finished run')
  args = p.parse_args(argv)
  exp = load_experiment(args.experiment)
  root = args.root or exp.root
  runs = expand(exp, root)
  only = set(args.only.split(',')) if args.only else None
  if only and only - {a['name'] for a in exp.arms}:
    raise SystemExit(f'--only names unknown arms: {sorted(only - {a["name"] for a in exp.arms})}')
  if args.dry_run:
    for run in runs:
      print(f'{state(run, root):8s} {run.name:36s} {run.config_arg} {dict(run.overrides)}')
    return
  if args.estimate:
    from moe_jax.experiments import estimate
    estimate.main(exp, root, args.estimate, lock=args.lock, only=only)
    return
  if not args.summarize_only:
    run_all(exp, [r for r in runs if not only or r.arm in only], root, lock=args.lock)
  summary = summarize(exp, collect(exp, runs, root))
  summary_path, plot_path = write_outputs(exp, summary, summary_path=args.summary,
                                          plot_path=args.plot)
  for c in summary['comparisons']:
    metric = '' if c['metric'] == 'metric' else f" [{c['metric']}]"
    print(f"{c['a']} - {c['b']}{metric}: {c['mean']:+.4g} [{c['low']:+.4g}, {c['high']:+.4g}] "
          f"(n={c['n']}): {c['verdict']}")
  print(f'summary {summary_path}\nplot {plot_path}')


if __name__ == '__main__':
  main()

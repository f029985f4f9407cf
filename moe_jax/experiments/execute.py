"""Executing an experiment's runs: one at a time, in a subprocess or in this process,
under an optional lock, with prepare hooks and extra evaluations; run_info.json records.

See `moe_jax.experiments.run` for the command line and the experiment config fields.
"""
from __future__ import annotations

import contextlib
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
from moe_jax.experiments import summary as summary_lib
from moe_jax.experiments.experiment import ROOT, Run, check_shared, expand, resolve, run_config, state

ARM_CONFIG = os.path.join(ROOT, 'moe_jax', 'experiments', 'arm_config.py')
EXIT_DIVERGED, EXIT_STOPPED = 3, 75


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
  if todo:
    print(f'{exp.name}: {len(runs)} of {len(runs)} runs done ({len(todo)} run now in '
          f'{_duration(spent)})', flush=True)
  for run in runs:               # extra evaluations of runs finished before this call
    if state(run, root) == 'done':
      train(run)
  return before


def _duration(seconds: float) -> str:
  m = int(seconds // 60)
  return f'{m // 60} h {m % 60:02d} min' if m >= 60 else f'{m} min {int(seconds % 60):02d} s'

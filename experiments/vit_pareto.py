r"""Router Pareto comparison on Fashion-MNIST (the CPU-scale analogue of Soft MoE Fig. 3).

Dense ViT vs tokens choice (k=1, k=2) vs experts choice vs Soft MoE, at two sizes, each
trained with `configs/vit/fashion_mnist.py`; test accuracy against training FLOPs and
wall time.

    python -m experiments.vit_pareto --sweep=cpu            # runs what is missing, then
                                                            # writes the summary and plot
    python -m experiments.vit_pareto --sweep=cpu --dry_run  # lists the runs and their state

Each run lives in `<root>/<run name>` (default root: workdirs/vit_pareto_<sweep>); a run
with results.json is skipped, one with only checkpoints resumes where it stopped, so an
interrupted sweep continues when the same command is rerun. Runs execute one at a time
in a subprocess (`python -m moe_jax.train.main`), so their wall times do not compete;
measure on an otherwise idle machine. The summary goes to
experiments/results/vit_pareto_<sweep>.json and the plot to
experiments/plots/vit_pareto_<sweep>.png (scripts/plot_pareto.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/vit/fashion_mnist.py'

# method -> (router of the config file, config overrides)
METHODS = {
    'dense': ('dense', {}),
    'tokens_choice_k1': ('tokens_choice', {'model.moe.router_kwargs.k': 1}),
    'tokens_choice_k2': ('tokens_choice', {'model.moe.router_kwargs.k': 2}),
    'experts_choice': ('experts_choice', {}),
    'soft_moe': ('soft_moe', {}),
}
SWEEPS = {
    # The comparison: every method at both CPU sizes, on a budget that fits a 2-core
    # machine (the config files' own schedules are 5000 steps): tiny for 1200 steps,
    # small for 600, evaluated once at the end on the full test set.
    'cpu': dict(methods=tuple(METHODS), sizes=('tiny', 'small'), overrides={},
                size_overrides={
                    'tiny': {'num_train_steps': 1200, 'eval_every_steps': 1200},
                    'small': {'num_train_steps': 600, 'eval_every_steps': 600}}),
    # The config files' full schedules (5000 steps): about 10x the cost of 'cpu'.
    'cpu_full': dict(methods=tuple(METHODS), sizes=('tiny', 'small'), overrides={}),
    # A few steps of two runs, to check the machinery.
    'smoke': dict(methods=('dense', 'soft_moe'), sizes=('tiny',),
                  overrides={'num_train_steps': 4, 'optimizer.warmup_steps': 1,
                             'log_every_steps': 2, 'eval_every_steps': 4,
                             'model.patch_size': 7, 'model.depth': 2, 'model.moe.last_n': 1}),
}


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  method: str
  size: str
  router: str
  overrides: dict

  @property
  def config_arg(self) -> str:
    return f'{CONFIG}:{self.router},{self.size}'


def sweep_runs(sweep: str, extra_overrides: dict | None = None) -> list[Run]:
  if sweep not in SWEEPS:
    raise ValueError(f'unknown sweep {sweep!r}; choose one of {sorted(SWEEPS)}.')
  s = SWEEPS[sweep]
  runs = []
  for size in s['sizes']:
    for method in s['methods']:
      router, method_overrides = METHODS[method]
      overrides = {**s['overrides'], **s.get('size_overrides', {}).get(size, {}),
                   **method_overrides, **(extra_overrides or {})}
      runs.append(Run(f'{method}_{size}', method, size, router, overrides))
  return runs


def state(run: Run, root: str) -> str:
  """'done' (results.json), 'partial' (checkpoints only) or 'todo'."""
  wd = os.path.join(root, run.name)
  if os.path.exists(os.path.join(wd, 'results.json')):
    return 'done'
  if os.path.isdir(os.path.join(wd, 'checkpoints')) and os.listdir(os.path.join(wd, 'checkpoints')):
    return 'partial'
  return 'todo'


def execute_subprocess(run: Run, workdir: str) -> None:
  """Trains one run with the command-line entry point (resumes if workdir has checkpoints)."""
  cmd = [sys.executable, '-m', 'moe_jax.train.main', f'--config={run.config_arg}',
         f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in run.overrides.items()]
  print('+', ' '.join(cmd), flush=True)
  subprocess.run(cmd, cwd=ROOT, check=True)


def load_config(run: Run):
  """The run's ConfigDict: the config file's get_config plus the run's overrides."""
  from moe_jax.train import config_lib
  module = config_lib.load_config_module(os.path.join(ROOT, CONFIG))
  config = module.get_config(f'{run.router},{run.size}')
  return config_lib.apply_overrides(config, run.overrides)


def execute_in_process(run: Run, workdir: str, *, stop_at_step: int | None = None) -> None:
  """Trains one run in this process (notebooks, tests)."""
  from moe_jax.train.trainer import train_and_evaluate
  train_and_evaluate(load_config(run), workdir, stop_at_step=stop_at_step)


def run_sweep(runs: list[Run], root: str,
              execute: Callable[[Run, str], None] = execute_subprocess) -> dict[str, str]:
  """Runs every unfinished run in order; returns {name: state before this call}."""
  before = {}
  for run in runs:
    before[run.name] = state(run, root)
    if before[run.name] == 'done':
      print(f'skip {run.name}: finished', flush=True)
      continue
    print(f'{"resume" if before[run.name] == "partial" else "start"} {run.name}', flush=True)
    execute(run, os.path.join(root, run.name))
  return before


def collect(runs: list[Run], root: str) -> list[dict]:
  """One summary row per finished run."""
  rows = []
  for run in runs:
    path = os.path.join(root, run.name, 'results.json')
    if not os.path.exists(path):
      continue
    with open(path) as f:
      r = json.load(f)
    rows.append(dict(name=run.name, method=run.method, size=run.size,
                     test_accuracy=r['final']['test_accuracy'], test_loss=r['final']['test_loss'],
                     train_flops=(r['train_flops'] or {}).get('total'),
                     train_time_s=r['train_time_s'], wall_time_s=r['wall_time_s'],
                     process_cpu_s=r.get('process_cpu_s'), steps=r['steps'],
                     params_total=r['params']['total'], params_active=r['params']['active'],
                     environment=r['environment']))
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sweep', default='cpu', choices=sorted(SWEEPS))
  p.add_argument('--root', default=None, help='run workdirs (default workdirs/vit_pareto_<sweep>)')
  p.add_argument('--summary', default=None, help='default experiments/results/vit_pareto_<sweep>.json')
  p.add_argument('--plot', default=None, help='default experiments/plots/vit_pareto_<sweep>.png')
  p.add_argument('--dry_run', action='store_true', help='list the runs and their state only')
  args = p.parse_args(argv)
  runs = sweep_runs(args.sweep)
  root = args.root or os.path.join(ROOT, 'workdirs', f'vit_pareto_{args.sweep}')
  if args.dry_run:
    for run in runs:
      print(f'{state(run, root):8s} {run.name:24s} {run.config_arg} {run.overrides}')
    return
  run_sweep(runs, root)
  rows = collect(runs, root)
  summary = args.summary or os.path.join(ROOT, 'experiments', 'results', f'vit_pareto_{args.sweep}.json')
  os.makedirs(os.path.dirname(summary), exist_ok=True)
  with open(summary, 'w') as f:
    json.dump(rows, f, indent=1)
  plot = args.plot or os.path.join(ROOT, 'experiments', 'plots', f'vit_pareto_{args.sweep}.png')
  subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'plot_pareto.py'), summary,
                  f'--out={plot}', f'--title=ViT routers on Fashion-MNIST ({args.sweep})'], check=True)
  print(f'summary {summary}\nplot {plot}')


if __name__ == '__main__':
  main()

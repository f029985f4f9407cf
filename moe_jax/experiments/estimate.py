r"""Measured cost of an experiment before running it: every arm, briefly, timed.

    python -m moe_jax.experiments.run --experiment=experiments/t5_switch_dense.py \
        --estimate=60 --lock=/tmp/cpu.lock

Each arm runs once (the first seed) for STEPS steps into <root>/_estimate/<name>/, with
as many evaluations as its real run makes, through the same path as a real run
(subprocess, prepare hooks, extra evaluations). Its cost in the real experiment is then

    wall seconds of the short run (start-up, data, compilation, evaluations, STEPS steps)
      + (real steps − STEPS) / measured steps per second      (+ its extra evaluations)

per seed. Printed per arm and in total, and written to <root>/_estimate/<name>/estimate.json
with the load average around each run (take it under --lock, on a quiet machine); the
per-arm numbers are also merged into experiments/estimates/<name>.json (committed: the
measured costs the experiment docstrings and the README quote).
"""
from __future__ import annotations

import copy
import json
import math
import os

import ml_collections

from moe_jax.experiments import run as run_lib
from moe_jax.experiments import summary as summary_lib


def shortened(exp: ml_collections.ConfigDict, steps: int) -> tuple[ml_collections.ConfigDict, dict]:
  """(the experiment with one seed and STEPS steps per arm, {arm: real (steps, evals)})."""
  short = copy.deepcopy(exp)
  short.seeds = tuple(exp.seeds[:1])
  real = {}
  for arm, r in zip(short.arms, run_lib.expand(exp)[::len(exp.seeds)]):
    c = run_lib.run_config(exp, r)
    n_evals = math.ceil(c.num_train_steps / c.eval_every_steps)
    real[arm['name']] = (c.num_train_steps, n_evals)
    arm['overrides'] = {**dict(arm.get('overrides') or {}), 'num_train_steps': steps,
                        'eval_every_steps': max(1, steps // n_evals),
                        'checkpoint_every_steps': steps,
                        'log_every_steps': min(c.log_every_steps, steps),
                        'optimizer.warmup_steps': min(c.optimizer.warmup_steps, steps // 2)}
  return short, real


def estimate(exp: ml_collections.ConfigDict, root: str, steps: int, *, lock: str | None = None,
             execute=run_lib.execute_subprocess, execute_eval=None, only=None) -> dict:
  """Runs the short arms (those in `only` when given); returns {'arms': {arm: {...}},
  'total_s': the measured arms' total, 'runs': n}."""
  short, real = shortened(exp, steps)
  if only:
    short.arms = [a for a in short.arms if a['name'] in only]
  est_root = os.path.join(root, '_estimate', exp.name)
  runs = run_lib.expand(short, est_root)
  run_lib.run_all(short, runs, est_root, execute, lock=lock, execute_eval=execute_eval)
  arms, total = {}, 0.0
  for r in runs:
    wd = r.workdir(est_root)
    with open(os.path.join(wd, summary_lib.RUN_INFO)) as f:
      info = json.load(f)
    res_path = os.path.join(wd, 'results.json')
    if not os.path.exists(res_path):
      arms[r.arm] = dict(diverged=info.get('diverged'))
      continue
    with open(res_path) as f:
      res = json.load(f)
    real_steps, n_evals = real[r.arm]
    wall = sum(s['wall_s'] for s in info['sessions']) + sum(info.get('evals_wall_s', {}).values())
    per_run = wall + (real_steps - steps) / res['steps_per_sec']
    arms[r.arm] = dict(steps_per_sec=res['steps_per_sec'], short_run_wall_s=wall,
                       overhead_s=wall - res['train_time_s'], real_steps=real_steps,
                       evals=n_evals, per_run_s=per_run, seeds=len(exp.seeds),
                       arm_s=per_run * len(exp.seeds), loadavg=info.get('loadavg'))
    total += per_run * len(exp.seeds)
  out = dict(experiment=exp.name, steps=steps, arms=arms, total_s=total,
             runs=len(short.arms) * len(exp.seeds), lock=lock)
  with open(os.path.join(est_root, 'estimate.json'), 'w') as f:
    json.dump(out, f, indent=1)
  return out


def record(out: dict, path: str) -> dict:
  """Merges `out` into the estimate record at `path` (arms measured earlier, e.g. with
  --only, are kept unless measured again); returns the record."""
  rec = {}
  if os.path.exists(path):
    with open(path) as f:
      rec = json.load(f)
  arms = {**rec.get('arms', {}), **{k: dict(v, steps=out['steps']) for k, v in out['arms'].items()}}
  rec = dict(experiment=out['experiment'], arms=arms,
             measured_total_s=sum(a.get('arm_s', 0.0) for a in arms.values()))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(rec, f, indent=1)
  return rec


def main(exp, root: str, steps: int, *, lock: str | None = None, only=None) -> dict:
  out = estimate(exp, root, steps, lock=lock, only=only)
  path = os.path.join(run_lib.ROOT, 'experiments', 'estimates', f'{exp.name}.json')
  rec = record(out, path)
  print(f"\n{exp.name}: estimated cost from {steps}-step runs ({out['runs']} runs)")
  print(f"{'arm':32s} {'steps/s':>8s} {'overhead s':>10s} {'steps':>6s} {'per run':>9s} "
        f"{'x seeds':>9s}  load")
  for name, a in out['arms'].items():
    if 'per_run_s' not in a:
      print(f'{name:32s} diverged: {a["diverged"]}')
      continue
    print(f"{name:32s} {a['steps_per_sec']:8.2f} {a['overhead_s']:10.0f} {a['real_steps']:6d} "
          f"{run_lib._duration(a['per_run_s']):>9s} {run_lib._duration(a['arm_s']):>9s}  "
          f"{a['loadavg']}")
  print(f"total of these arms: {run_lib._duration(out['total_s'])} ({out['total_s'] / 3600:.2f} h); "
        f"all arms measured so far ({len(rec['arms'])} of {len(exp.arms)}): "
        f"{rec['measured_total_s'] / 3600:.2f} h, recorded in {path}")
  return out

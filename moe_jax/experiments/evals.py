r"""Evaluates a finished run again, from its final checkpoint, with config overrides.

    python -m moe_jax.experiments.evals --workdir=DIR --name=causal \
        --overrides="{'model.moe.router_kwargs.eval_rule': 'token_top_k'}"

The model is the run's own (config from results.json, variables from its newest
checkpoint) built with the overridden config, so an override may change how it routes
at evaluation (an expert-choice decoder evaluated with a causal rule, a larger eval
capacity) but not the shapes of its parameters. The whole eval set of the task is used,
as in training. Writes <workdir>/evals/<name>.json: {'final': the task's final metrics,
'eval': every eval metric (routing metrics included), 'overrides', 'step'}.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys

EVALS_DIR = 'evals'


def output_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, EVALS_DIR, f'{name}.json')


def evaluate_workdir(workdir: str, overrides: dict) -> dict:
  """The run of `workdir` evaluated with `overrides` applied to its config."""
  from flax import nnx

  from moe_jax import tasks
  from moe_jax.train import config_lib, steps, trainer
  from moe_jax.train import workdir as workdir_lib
  config = config_lib.apply_overrides(workdir_lib.load_config(workdir), overrides)
  task = tasks.TASKS[config.task.name](config)
  task.prepare()
  model, _ = workdir_lib.load_model(workdir, config=config)
  evaluation = trainer.evaluate(steps.make_eval_step(model, task), nnx.state(model), task)
  ev = dict(evaluation.metrics)
  ev.update({k: [float(x) for x in v] for k, v in evaluation.vectors.items()})   # load vectors
  return dict(final=task.final_metrics(evaluation.metrics), eval=ev, overrides=overrides,
              step=workdir_lib.load_record(workdir).get('steps'))


def run_and_write(workdir: str, name: str, overrides: dict) -> dict:
  out = evaluate_workdir(workdir, overrides)
  path = output_path(workdir, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(out, f, indent=1)
  os.replace(path + '.tmp', path)
  return out


def execute_subprocess(workdir: str, name: str, overrides: dict) -> None:
  cmd = [sys.executable, '-m', 'moe_jax.experiments.evals', f'--workdir={workdir}',
         f'--name={name}', f'--overrides={overrides!r}']
  print('+', ' '.join(cmd), flush=True)
  subprocess.run(cmd, check=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--name', required=True, help='writes <workdir>/evals/<name>.json')
  p.add_argument('--overrides', default='{}', help="a Python dict literal of dotted config keys")
  args = p.parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  out = run_and_write(args.workdir, args.name, ast.literal_eval(args.overrides))
  print(f'{args.name}: {out["final"]}')


if __name__ == '__main__':
  main()

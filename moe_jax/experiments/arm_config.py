r"""A run config file for one run of an experiment (the runner's subprocesses use it).

    python -m moe_jax.train.main \
        --config=moe_jax/experiments/arm_config.py:workdirs/<exp>/<arm>/seed_0.config \
        --workdir=workdirs/<exp>/<arm>/seed_0

The argument is a recipe the runner writes beside the workdir: a Python literal
{'config_file': ..., 'config_arg': ..., 'overrides': {dotted key: value}}. The config is
the config file's get_config(config_arg) with the overrides set before the config is
locked, so an override may add a key the file does not define (a router option such as
`model.moe.router_kwargs.eval_rule`), which `--config.<key>=...` on a locked config
cannot, and values keep their Python types (tuples stay tuples).
"""
import ast
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from moe_jax.experiments import experiment  # noqa: E402


def get_config(recipe_path: str):
  with open(recipe_path) as f:
    recipe = ast.literal_eval(f.read())
  return experiment.config_for(recipe['config_file'], recipe['config_arg'], recipe['overrides'])

"""Reading a finished or interrupted run's workdir: its config and its trained model.

    config = load_config('workdirs/demo_lm')        # results.json, else the checkpoint's
    model, config = load_model('workdirs/demo_lm')  # built from the config, weights restored

Used by the scripts that look at a trained model (`scripts/sample.py`,
`scripts/inspect_routing.py`). Reads only: nothing in the workdir changes.
"""
from __future__ import annotations

import json
import os

import ml_collections
from flax import nnx

from moe_jax.train import checkpoint, config_lib


def load_record(workdir: str) -> dict:
  """results.json of a finished run, else the latest checkpoint's JSON item (config,
  data position, tokenizer...); {} when there is neither."""
  path = os.path.join(workdir, 'results.json')
  if os.path.exists(path):
    try:
      with open(path) as f:
        return json.load(f)
    except json.JSONDecodeError:
      pass
  return checkpoint.read_latest_meta(workdir) or {}


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config: results.json's, else the latest checkpoint's (interrupted run)."""
  config = load_record(workdir).get('config')
  if config is None:
    raise ValueError(f'{workdir} holds neither results.json nor a checkpoint with its config: '
                     'is it a workdir of `python -m moe_jax.train.main`?')
  return ml_collections.ConfigDict(config)


def load_model(workdir: str, step: int | None = None,
               config: ml_collections.ConfigDict | None = None):
  """(model, config): the model of `workdir`'s config with its checkpoint's variables.

  RNG keys stay fresh (the checkpoint stores raw key data); every other variable, the
  router state included, comes from the checkpoint. `config` (default: the run's own)
  builds the model instead, e.g. the run's config with another evaluation routing rule;
  its parameters must have the checkpoint's shapes.
  """
  config = load_config(workdir) if config is None else config
  model = config_lib.build_model(config.model, rngs=nnx.Rngs(0))
  flat = checkpoint.read_model_variables(workdir, step)
  if flat is None:
    raise ValueError(f'{workdir} holds no checkpoint.')
  state = nnx.state(model)
  pure = nnx.to_pure_dict(state)
  own = checkpoint.flatten_state(pure)
  missing = [p for p in own if p not in flat]
  if missing:
    raise ValueError(f'the checkpoint of {workdir} lacks {["/".join(p) for p in missing[:3]]} '
                     'of the model its config builds (was the code changed?).')
  keep_keys = {p: (v if checkpoint.is_key(v) else flat[p])
               for p, v in own.items()}
  nnx.replace_by_pure_dict(state, checkpoint.unflatten_like(pure, keep_keys))
  nnx.update(model, state)
  return model, config

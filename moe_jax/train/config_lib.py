"""Config plumbing shared by every config file, the trainer and the experiment runner.

    c = config_lib.base_config()          # trainer fields (model, task, data: the family's base)
    config_lib.set_router(c.model.moe, 'tokens_choice', k=2)
    config_lib.validate(c)                # ConfigError naming the field, before any work

Family bases (`moe_jax.configs.vit.base_config`, `moe_jax.configs.t5...`) add `task`,
`model` and `data`; `config.model.name` and `config.task.name` are keys of
`moe_jax.models.MODELS` and `moe_jax.tasks.TASKS`.
"""
from __future__ import annotations

import difflib
import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from moe_jax.errors import ConfigError
from moe_jax.layers import ROUTERS

# Router defaults for the CPU configs: the papers' settings at the capacity of the
# Soft MoE paper's comparison (C = 1 slot per token and choice).
ROUTER_KWARGS = {
    'dense': {},
    'tokens_choice': dict(k=1, capacity_factor=1.0, batch_priority=True),
    'experts_choice': dict(capacity_factor=1.0),
    'soft_moe': dict(num_slots=1),
}


def load_config_module(path: str):
  """Imports a config file by path, the way `config_flags` does."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def apply_overrides(c: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """Sets dotted keys in place, like `--config.a.b=v` on the command line; returns c."""
  for key, value in overrides.items():
    *path, last = key.split('.')
    node = c
    for part in path:
      node = node[part]
    node[last] = value
  return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'soft_moe,tiny' or 'router=soft_moe,size=tiny' -> ConfigDict(router=..., size=...).

  Bare values are matched to the keys of `defaults` whose allowed values (a tuple)
  contain them; `key=value` sets a key directly. Each default is (value, allowed).
  """
  out = {k: v for k, (v, _) in defaults.items()}
  for tok in filter(None, (t.strip() for t in (arg or '').split(','))):
    if '=' in tok:
      k, v = tok.split('=', 1)
      if k not in defaults:
        raise ValueError(f'unknown config argument {k!r}; known: {sorted(defaults)}.')
    else:
      keys = [k for k, (_, allowed) in defaults.items() if tok in allowed]
      if not keys:
        opts = {k: list(allowed) for k, (_, allowed) in defaults.items()}
        raise ValueError(f'config argument {tok!r} is not one of {opts}.')
      k, v = keys[0], tok
    if v not in defaults[k][1]:
      raise ValueError(f'config argument {k}={v!r} must be one of {list(defaults[k][1])}.')
    out[k] = v
  return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
  """The trainer's own fields, with CPU-friendly defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_train_steps = 1000
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.count_flops = True
  # Routing pictures in TensorBoard at every evaluation: this many eval examples drawn
  # per MoE layer (patches / tokens coloured by expert, Soft MoE slots) and the load
  # heat map; 0 turns them off (moe_jax/inspection). On a mesh only the heat map.
  c.routing_pictures = 2
  # A non-finite loss or gradient norm: 'stop' the run (exit status 3; the last
  # checkpoint is the last good state) or 'skip' the update and count it, stopping after
  # max_skipped_steps skips (see train/divergence.py).
  c.on_nonfinite = 'stop'
  c.max_skipped_steps = 100

  # AdamW with linear warmup and cosine decay (see builders.build_optimizer).
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=100, end_lr_fraction=0.0, weight_decay=1e-4,
      b1=0.9, b2=0.999, grad_clip_norm=1.0))

  # Sparse upcycling (moe_jax.train.upcycle): a fresh run starts from this dense run's
  # latest checkpoint, every expert a copy of the dense MLP at the same place.
  c.init_from = ml_collections.ConfigDict(dict(dense_workdir=config_dict.placeholder(str)))

  # Device mesh (see moe_jax.parallel.mesh): all 1 = one device, no mesh. E.g.
  # --config.mesh.data=2 --config.mesh.expert=4 trains on 8 devices, experts split over
  # `expert`, the batch over (data, expert); -1 fills an axis with the remaining devices.
  # axis_types 'auto': the compiler propagates shardings through the model (the models
  # have no sharding annotations; 'explicit' would need them on every reshape).
  c.mesh = ml_collections.ConfigDict(dict(data=1, expert=1, model=1, axis_types='auto'))
  return c


def set_router(moe: ml_collections.ConfigDict, router: str, **router_kwargs) -> None:
  """Sets an MoE block's router and its default kwargs (plus overrides)."""
  if router != 'dense' and router not in ROUTERS:
    raise ConfigError(f"{router!r} is not 'dense' or a key of layers.ROUTERS {sorted(ROUTERS)}.",
                      field='router')
  moe.router = router
  kw = dict(ROUTER_KWARGS.get(router, {}))
  kw.update(router_kwargs)
  moe.router_kwargs = ml_collections.ConfigDict(kw)


def validate_trainer_fields(c: ml_collections.ConfigDict) -> None:
  """The trainer's own fields (steps, batch sizes, optimizer, mesh)."""
  def need(ok, field, msg):
    if not ok:
      raise ConfigError(msg, field=f'config.{field}')
  for f in ('num_train_steps', 'batch_size', 'eval_batch_size', 'log_every_steps',
            'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    need(isinstance(c[f], int) and c[f] >= 1, f, f'must be an int >= 1, got {c[f]!r}.')
  need(isinstance(c.seed, int) and 0 <= c.seed < 2 ** 31, 'seed',
       f'must be an int in [0, 2**31), got {c.seed!r}.')
  need(c.get('on_nonfinite', 'stop') in ('stop', 'skip'), 'on_nonfinite',
       f"must be 'stop' or 'skip', got {c.get('on_nonfinite')!r}.")
  need(c.get('max_skipped_steps', 0) >= 0, 'max_skipped_steps', 'must be >= 0.')
  pictures = c.get('routing_pictures', 0)
  need(isinstance(pictures, int) and pictures >= 0, 'routing_pictures',
       f'must be an int >= 0 (examples drawn at each evaluation), got {pictures!r}.')
  need(c.optimizer.learning_rate > 0, 'optimizer.learning_rate', 'must be > 0.')
  need(0 <= c.optimizer.warmup_steps < c.num_train_steps, 'optimizer.warmup_steps',
       f'must be in [0, num_train_steps={c.num_train_steps}), got {c.optimizer.warmup_steps}; '
       'lower --config.optimizer.warmup_steps.')
  for axis in ('data', 'expert', 'model'):
    size = c.mesh.get(axis, 1)
    need(size == -1 or size >= 1, f'mesh.{axis}', f'must be >= 1 or -1 (all remaining devices), '
         f'got {size}.')


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the field for a bad config, before any data or compute.

  Checks the trainer's fields, the task's (`Task.validate_config`) and the model's: the
  model is built abstractly (`nnx.eval_shape`: shapes only), so every constructor check
  (router kwargs against the router, MoE placement, sizes that must divide) runs here.
  """
  from moe_jax import models, tasks   # registries; imported late (they import TF / data)
  validate_trainer_fields(c)
  task_name = c.task.get('name') if 'task' in c else None
  if task_name not in tasks.TASKS:
    raise ConfigError(f'{task_name!r} is not one of {sorted(tasks.TASKS)}.', field='config.task.name')
  tasks.TASKS[task_name].validate_config(c)
  build_abstract_model(c.model)


def model_class(model: ml_collections.ConfigDict):
  from moe_jax import models
  name = model.get('name')
  if name not in models.MODELS:
    raise ConfigError(f'{name!r} is not one of {sorted(models.MODELS)}.', field='config.model.name')
  return models.MODELS[name]


def model_kwargs(model: ml_collections.ConfigDict) -> dict:
  """config.model without its name: the model class's constructor keywords."""
  return {k: v for k, v in model.to_dict().items() if k != 'name'}


def build_model(model: ml_collections.ConfigDict, *, rngs):
  """`MODELS[config.model.name](**other fields, rngs=rngs)`; a bad field -> ConfigError."""
  cls = model_class(model)
  try:
    return cls(**model_kwargs(model), rngs=rngs)
  except ConfigError as e:
    raise (e if (e.field or '').startswith('config.') else e.under('config.model')) from None
  except (ValueError, TypeError, ArithmeticError) as e:
    raise ConfigError(f'{type(e).__name__}: {e}' if isinstance(e, ArithmeticError) else str(e),
                      field='config.model') from None


def build_abstract_model(model: ml_collections.ConfigDict):
  """The model with ShapeDtypeStruct leaves (no memory, no compute): validates its config."""
  from flax import nnx
  return nnx.eval_shape(lambda: build_model(model, rngs=nnx.Rngs(0)))


def unknown_override_message(argv: list[str]) -> str | None:
  """For `--config.a.b=v` flags whose field the config file lacks (ml_collections then
  raises a bare AttributeError): the first such field, what its group has (or, under
  `router_kwargs`, what the router takes) and the nearest name. None if none is found."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None:
    return None
  path, _, arg = spec.partition(':')
  try:
    config = load_config_module(path).get_config(arg or None)
  except Exception:   # noqa: BLE001 - the config file's own error is reported elsewhere
    return None
  for a in argv:
    if not a.startswith('--config.'):
      continue
    keys = a[len('--config.'):].split('=', 1)[0].split('.')
    node = config
    for i, key in enumerate(keys):
      if isinstance(node, ml_collections.ConfigDict) and key in node:
        node = node[key]
        continue
      field, parent = 'config.' + '.'.join(keys[:i + 1]), keys[:i]
      if parent and parent[-1] == 'router_kwargs':
        moe = config
        for k in parent[:-1]:
          moe = moe[k]
        router = ROUTERS.get(moe.get('router'))
        if router is not None and key in router.accepted_kwargs():
          return (f'{field}: {router.__name__} takes {key!r}, but the config file does not list '
                  f'it and a --config flag can only change listed fields: set it in the config '
                  f'file (router_kwargs), or in an experiment config (its overrides may add '
                  f'router options).')
        if router is not None:
          try:
            router.check_kwargs({key: None})
          except ConfigError as e:
            return f'{field}: {e.detail}'
      fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      near = difflib.get_close_matches(key, fields, n=1)
      hint = f' Did you mean {near[0]!r}?' if near else ''
      group = 'config.' + '.'.join(parent) if parent else 'the config'
      return (f'{field}: no such field in {path}.{hint} '
              + (f'{group} has: {", ".join(fields)}.' if fields else f'{group} is not a group.'))
  return None

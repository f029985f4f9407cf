"""Defaults shared by the ViT config files, argument parsing and config validation.

Config files (`configs/vit/*.py`) start from `vit_base_config()` and change what their
experiment needs. Every field a user may want to override on the command line
(`--config.model.moe.last_n=3`) exists here, typed, so `config_flags` can check it.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from moe_jax.layers import ENGINES, ROUTERS
from moe_jax.models.token_ids import TOKEN_ID_FNS
from moe_jax.models.vit import DTYPES, PRESETS  # noqa: F401 (PRESETS re-exported)

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


def vit_base_config() -> ml_collections.ConfigDict:
  """All fields the ViT trainer reads, with CPU-friendly defaults."""
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

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=100, end_lr_fraction=0.0, weight_decay=1e-4,
      b1=0.9, b2=0.999, grad_clip_norm=1.0, label_smoothing=0.0))

  c.model = ml_collections.ConfigDict(dict(
      size='tiny', num_classes=10, image_size=28, channels=1, pool='gap', posemb='learn',
      dtype='float32', token_ids='position', **PRESETS['tiny']))
  # Options of token_ids='patch_content' (models.token_ids.patch_content_ids; the pixel
  # range comes from the data pipeline). Hash routers read these ids.
  c.model.patch_content = ml_collections.ConfigDict(dict(levels=4, bits=4, flat_std=0.02, seed=0))
  c.model.moe = ml_collections.ConfigDict(dict(
      router='soft_moe', router_kwargs=dict(ROUTER_KWARGS['soft_moe']), num_experts=16,
      expert_hidden=config_dict.placeholder(int), engine='gather',
      group_size=config_dict.placeholder(int), every=config_dict.placeholder(int),
      last_n=config_dict.placeholder(int), layers=config_dict.placeholder(tuple),
      glu=False, activation='gelu'))

  c.data = ml_collections.ConfigDict(dict(
      name='fashion_mnist', train_split='train', eval_split='test',
      data_dir=config_dict.placeholder(str), idx_dir=config_dict.placeholder(str),
      download=True, mode='memory', augment='none', shuffle_buffer=10_000))

  # Sparse upcycling (moe_jax.train.upcycle): a fresh run starts from this dense run's
  # latest checkpoint, every expert a copy of the dense MLP.
  c.init_from = ml_collections.ConfigDict(dict(
      dense_workdir=config_dict.placeholder(str), mode='upcycle'))

  # Device mesh (see moe_jax.parallel.mesh): all 1 = one device, no mesh. E.g.
  # --config.mesh.data=2 --config.mesh.expert=4 trains on 8 devices, experts split over
  # `expert`, the batch over (data, expert); -1 fills an axis with the remaining devices.
  # axis_types 'auto': the compiler propagates shardings through the model (the ViT has
  # no sharding annotations; 'explicit' would need them on every reshape).
  c.mesh = ml_collections.ConfigDict(dict(data=1, expert=1, model=1, axis_types='auto'))
  return c


def set_router(c: ml_collections.ConfigDict, router: str, **router_kwargs) -> None:
  """Sets config.model.moe.router and its default kwargs (plus overrides)."""
  if router != 'dense' and router not in ROUTERS:
    raise ValueError(f'router {router!r} is not dense or a key of layers.ROUTERS {sorted(ROUTERS)}.')
  c.model.moe.router = router
  kw = dict(ROUTER_KWARGS.get(router, {}))
  kw.update(router_kwargs)
  c.model.moe.router_kwargs = ml_collections.ConfigDict(kw)


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field and the allowed values for a bad config."""
  def need(ok, field, msg):
    if not ok:
      raise ValueError(f'config.{field}: {msg}')
  m, moe = c.model, c.model.moe
  need(moe.router == 'dense' or moe.router in ROUTERS, 'model.moe.router',
       f"{moe.router!r} is not 'dense' or one of {sorted(ROUTERS)}.")
  need(moe.engine in ENGINES, 'model.moe.engine', f'{moe.engine!r} is not one of {sorted(ENGINES)}.')
  need(m.pool in ('gap', 'token'), 'model.pool', f"{m.pool!r} is not 'gap' or 'token'.")
  need(m.dtype in DTYPES, 'model.dtype', f'{m.dtype!r} is not one of {sorted(DTYPES)}.')
  need(m.token_ids in TOKEN_ID_FNS, 'model.token_ids', f'{m.token_ids!r} not in {sorted(TOKEN_ID_FNS)}.')
  need(moe.router == 'dense' or moe.num_experts >= 1, 'model.moe.num_experts', 'must be >= 1.')
  for f in ('num_train_steps', 'batch_size', 'eval_batch_size', 'log_every_steps',
            'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    need(c[f] >= 1, f, f'must be >= 1, got {c[f]}.')
  need(c.optimizer.learning_rate > 0, 'optimizer.learning_rate', 'must be > 0.')
  need(0 <= c.optimizer.warmup_steps < c.num_train_steps, 'optimizer.warmup_steps',
       f'must be in [0, num_train_steps={c.num_train_steps}), got {c.optimizer.warmup_steps}; '
       'lower --config.optimizer.warmup_steps.')
  need(m.image_size % m.patch_size == 0, 'model.patch_size',
       f'{m.patch_size} does not divide image_size {m.image_size}.')
  need(m.width % m.num_heads == 0, 'model.num_heads', f'{m.num_heads} does not divide width {m.width}.')
  for axis in ('data', 'expert', 'model'):
    size = c.mesh.get(axis, 1)
    need(size == -1 or size >= 1, f'mesh.{axis}', f'must be >= 1 or -1 (all remaining devices), '
         f'got {size}.')

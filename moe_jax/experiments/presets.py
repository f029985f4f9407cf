"""Pieces the experiment configs under experiments/ share: arms, schedules, smoke shapes.

    from moe_jax.experiments import presets as P
    c.arms = [P.arm('dense', 'dense,tiny', P.schedule(1000, evals=10)), ...]
"""
from __future__ import annotations

import ml_collections

VIT = 'configs/vit/fashion_mnist.py'
SPAN = 'configs/t5/span_corruption.py'
CAUSAL = 'configs/t5/causal_lm.py'


VARIANTS = ('cpu', 'smoke')
METRICS = {'test_accuracy': dict(metric_label='test accuracy (%)', metric_scale=100.0),
           'neg_log_perplexity': dict(metric_label='validation neg. log perplexity')}


def experiment(name: str, variant: str | None, title: str, config_file: str, *,
               metric: str) -> ml_collections.ConfigDict:
  """The fields every experiment config sets: `<name>_<variant>`, its title, the config
  file, seeds (3, or 2 for 'smoke') and the headline metric. Variants: 'cpu' (default),
  'smoke'."""
  variant = variant or 'cpu'
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r}; choose one of {VARIANTS}.')
  c = ml_collections.ConfigDict()
  c.name = f'{name}_{variant}'
  c.title = f'{title} ({variant})'
  c.config_file = config_file
  c.seeds = (0, 1) if variant == 'smoke' else (0, 1, 2)
  c.metric = metric
  c.update(METRICS[metric])
  return c


def arm(name: str, config_arg: str, overrides: dict | None = None, *, group: str | None = None,
        label: str = '', x: float | None = None, config_file: str | None = None) -> dict:
  """One arm of an experiment (see `moe_jax.experiments.run`)."""
  a = dict(name=name, config_arg=config_arg, overrides=dict(overrides or {}),
           group=group or name, label=label)
  if x is not None:
    a['x'] = x
  if config_file:
    a['config_file'] = config_file
  return a


def schedule(steps: int, *, evals: int = 1, warmup: int = 100, log_every: int = 50,
             checkpoints: int = 2) -> dict:
  """Overrides for a run of `steps` steps with `evals` evenly spaced evaluations (the last
  at the end), `checkpoints` checkpoints, and `warmup` warm-up steps."""
  return {'num_train_steps': steps, 'eval_every_steps': max(1, steps // evals),
          'checkpoint_every_steps': max(1, steps // checkpoints),
          'log_every_steps': min(log_every, steps), 'optimizer.warmup_steps': min(warmup, steps // 2)}


def merge(*dicts: dict) -> dict:
  out = {}
  for d in dicts:
    out.update(d)
  return out


# Smoke shapes: a few steps of width-16 models (the test suite adds its mock data's
# location and vocabulary). Each stays a few seconds on 2 cores.
SMOKE_SCHEDULE = schedule(4, evals=2, warmup=1, log_every=2, checkpoints=1)
SMOKE_VIT = {'model.patch_size': 7, 'model.width': 16, 'model.mlp_dim': 32, 'model.num_heads': 2,
             'model.depth': 2, 'model.moe.last_n': 1, 'batch_size': 8, 'eval_batch_size': 16}
SMOKE_LM = {'model.width': 16, 'model.num_heads': 2, 'model.head_dim': 8, 'model.mlp_dim': 32,
            'batch_size': 4, 'eval_batch_size': 4, 'data.eval_max_rows': 8}
SMOKE_CAUSAL = merge(SMOKE_LM, {'data.seq_len': 16, 'model.depth': 2})
SMOKE_SPAN = merge(SMOKE_LM, {'data.inputs_length': 16, 'model.max_target_length': 5,
                              'model.encoder_depth': 2, 'model.decoder_depth': 2})


def smoke(config_file: str) -> dict:
  return merge(SMOKE_SCHEDULE, {VIT: SMOKE_VIT, SPAN: SMOKE_SPAN, CAUSAL: SMOKE_CAUSAL}[config_file])

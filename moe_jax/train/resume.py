"""What a resumed run may change: the config of the checkpoint against the new one.

    changes = config_changes(saved_config_json, new_config_json)   # {field: (old, new)}

Operational fields (logging, evaluation and checkpoint intervals, where the data lives,
the device mesh) change freely. A change that alters the shapes of the saved state (the
model's sizes, experts, vocabulary) cannot be resumed: `shape_change_error` lists every
changed field with both values. Any other change (learning rate, schedule length,
router options, loss weights) mixes two configs in one run, so it needs the explicit
`allow_config_change` flag; it is then logged and recorded in results.json with the
step where it happened. The seed never changes: it fixes the data order.
"""
from __future__ import annotations

from moe_jax.errors import ConfigError

OPERATIONAL = ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
               'keep_checkpoints', 'count_flops', 'eval_batch_size', 'mesh', 'data.data_dir',
               'data.idx_dir', 'data.download', 'routing_pictures')


def flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _operational(field: str) -> bool:
  return any(field == f or field.startswith(f + '.') for f in OPERATIONAL)


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
  """{dotted field: (old value, new value)} over non-operational fields that differ."""
  a, b = flatten(old), flatten(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
          if a.get(k) != b.get(k) and not _operational(k)}


def describe(changes: dict) -> str:
  return '; '.join(f'config.{k}: {old!r} in the checkpoint, {new!r} now'
                   for k, (old, new) in changes.items())


def check_changes(workdir: str, step: int, changes: dict, *, allow: bool) -> None:
  """Raises ConfigError for a seed change, or for any change without `allow`."""
  if 'seed' in changes:
    old, new = changes['seed']
    raise ConfigError(f'{workdir} was trained with seed {old}, the config has {new}: use a new '
                      'workdir or the same seed (the seed fixes the data order).',
                      field='config.seed')
  if changes and not allow:
    raise ConfigError(
        f'resuming {workdir} at step {step} with a different config: {describe(changes)}. '
        'Rerun with the checkpoint\'s values, use a new workdir, or pass --allow_config_change '
        'to continue with the new values (recorded in results.json).', field='config')


def shape_change_error(workdir: str, step: int, changes: dict, mismatches: list[str]) -> ConfigError:
  """The error for a checkpoint whose arrays do not fit the new model."""
  shown = {k: v for k, v in changes.items() if k.startswith('model.')} or changes
  what = describe(shown) if shown else 'no config field differs (was the code changed?)'
  return ConfigError(
      f'cannot resume {workdir} (step {step}): the model changed shape. {what}. '
      f'First mismatching arrays: {"; ".join(mismatches[:3])}. Use a new workdir for a '
      'different model.', field='config.model')

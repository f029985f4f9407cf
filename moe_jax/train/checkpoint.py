"""orbax checkpoints: train state plus a JSON item (data position, timers, config).

    mngr = make_manager(workdir, every=500, keep=3)
    restored = restore_latest(mngr, state)          # None on a fresh workdir
    if restored: state, meta = restored.state, restored.meta
    save(mngr, step, state, meta, force=False)      # call EVERY step; the policy decides

Saves are atomic (orbax writes a temporary directory and renames it when complete;
`latest_step` ignores unfinished ones) and asynchronous.

A damaged checkpoint (a file truncated or deleted, an item missing, an empty step
directory) never stops a run that has an older intact one: `restore_latest` says which
step directory is damaged and why, moves it to <workdir>/checkpoints_damaged/, and
restores the newest intact step (`strict=True` raises instead). A step whose arrays do
not match the model's shapes is not damage but a changed config: `ShapeMismatch`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

ITEMS = ('state', 'meta')


class CheckpointError(RuntimeError):
  """No checkpoint can be restored (all damaged, or one damaged under strict restore)."""


class ShapeMismatch(ValueError):
  """The checkpoint's arrays do not have the shapes of the model being restored.

  Attributes:
    step, meta: the step and its JSON item (whose 'config' says what it was trained with).
    mismatches: ['path: checkpoint (8, 64) vs model (4, 64)', ...].
  """

  def __init__(self, step: int, meta: dict, mismatches: list[str]):
    self.step, self.meta, self.mismatches = step, meta, mismatches
    super().__init__(f'checkpoint step {step} does not fit the model: {mismatches[:3]}')


@dataclasses.dataclass
class Restored:
  state: object
  meta: dict
  step: int
  damaged: list       # [(step, reason)] newer steps that could not be restored


def make_manager(workdir: str, *, every: int, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                           cleanup_tmp_directories=True),
      item_names=ITEMS,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'meta': ocp.JsonCheckpointHandler()})


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict, *, force: bool = False) -> bool:
  """Offers step `step` to the manager (saved on its interval, on preemption, or when forced).

  The save is asynchronous: orbax serialises the JSON item later, in a background thread.
  It gets a copy of `meta`, which the caller goes on changing (step, data position), so a
  checkpoint's meta is always its own step's.
  """
  if not (force or mngr.should_save(step)):
    return False
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(json.loads(json.dumps(meta)))),
      force=force)


def step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


def structure_problem(path: str) -> str | None:
  """Why the step directory `path` cannot be a complete checkpoint, or None (cheap checks)."""
  if not os.path.isdir(path):
    return 'the directory is missing'
  if not os.listdir(path):
    return 'the directory is empty'
  for item in ITEMS:
    if not os.path.isdir(os.path.join(path, item)):
      return f'its {item!r} item is missing'
  if not os.listdir(os.path.join(path, 'state')):
    return "its 'state' item is empty"
  return None


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The JSON item of step `step` (raises on a damaged one)."""
  return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


def shape_mismatches(mngr: ocp.CheckpointManager, step: int, target) -> list[str]:
  """Paths whose checkpointed shape differs from `target`'s (or that one side lacks)."""
  saved = {_path_str(p): tuple(m.shape)
           for p, m in jax.tree_util.tree_leaves_with_path(mngr.item_metadata(step)['state'])}
  want, keys = {}, set()
  for p, v in jax.tree_util.tree_leaves_with_path(target):
    if is_key(v):
      keys.add(_path_str(p))     # stored as raw key data: its shape is the RNG's, not ours
    else:
      want[_path_str(p)] = tuple(v.shape)
  saved = {k: v for k, v in saved.items() if k not in keys}
  out = [f'{k}: checkpoint {saved[k]} vs model {want[k]}' for k in sorted(saved.keys() & want.keys())
         if saved[k] != want[k]]
  out += [f'{k}: only in the checkpoint' for k in sorted(saved.keys() - want.keys())]
  out += [f'{k}: only in the model' for k in sorted(want.keys() - saved.keys())]
  return out


def _path_str(path) -> str:
  """'0/blocks/1/mlp/experts/w_in' for an orbax metadata path or an nnx.State path."""
  parts = []
  for k in path:
    for attr in ('key', 'idx', 'name'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return '/'.join(p for p in parts if p != 'value')


def restore(mngr: ocp.CheckpointManager, step: int, target) -> tuple:
  """Restores step `step` into the structure, shapes and shardings of `target` -> (state, meta)."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  r = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                 meta=ocp.args.JsonRestore()))
  return r.state, r.meta


def short_reason(e: BaseException) -> str:
  """The first line of an exception chain's root message, without library paths."""
  root = e
  while root.__cause__ is not None or root.__context__ is not None:
    root = root.__cause__ or root.__context__
  lines = [l.strip() for l in str(root).splitlines() if l.strip()] or [type(root).__name__]
  text = lines[0]
  return f'{type(root).__name__}: {text[:300]}'


def quarantine(mngr: ocp.CheckpointManager, step: int) -> str:
  """Moves a damaged step directory out of the manager's sight; returns where it went."""
  src = step_dir(mngr, step)
  dst_root = os.path.join(os.path.dirname(str(mngr.directory)), 'checkpoints_damaged')
  os.makedirs(dst_root, exist_ok=True)
  dst = os.path.join(dst_root, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
  shutil.move(src, dst)
  mngr.reload()
  return dst


def restore_latest(mngr: ocp.CheckpointManager, target, *, strict: bool = False,
                   check_meta=None) -> Restored | None:
  """The newest intact checkpoint restored into `target`, or None when there is none.

  Newer damaged steps are reported (one warning each: which directory, why), moved to
  checkpoints_damaged/ and skipped. `check_meta(step, meta)` runs before the arrays are
  read (the trainer compares configs there; its errors propagate). A shape mismatch
  raises `ShapeMismatch`: older steps would not fit either, so there is no fallback.

  Raises:
    CheckpointError: strict and the newest step is damaged, or every step is damaged.
  """
  damaged = []
  for step in sorted(mngr.all_steps(), reverse=True):
    path = step_dir(mngr, step)
    reason = structure_problem(path)
    meta = None
    if reason is None:
      try:
        meta = read_meta(mngr, step)
      except Exception as e:   # noqa: BLE001 - any read failure means a damaged item
        reason = f"its 'meta' item cannot be read ({short_reason(e)})"
    if reason is None:
      if check_meta is not None:
        check_meta(step, meta)
      try:
        mismatches = shape_mismatches(mngr, step, target)
      except Exception as e:   # noqa: BLE001
        reason = f"its 'state' metadata cannot be read ({short_reason(e)})"
      else:
        if mismatches:
          raise ShapeMismatch(step, meta, mismatches)
    if reason is None:
      try:
        state, meta = restore(mngr, step, target)
      except Exception as e:   # noqa: BLE001
        reason = f"its arrays cannot be read ({short_reason(e)})"
    if reason is None:
      if damaged:
        logging.warning('Fell back to checkpoint step %d (the newest intact one); steps since '
                        'then are trained again.', step)
      return Restored(state, meta, step, damaged)
    if strict:
      raise CheckpointError(
          f'checkpoint {path} is damaged: {reason}. Move it away to fall back to an older '
          'step, or rerun without --strict_restore to do that automatically.')
    moved = quarantine(mngr, step)
    logging.warning('Checkpoint %s is damaged: %s. Moved it to %s.', path, reason, moved)
    damaged.append((step, reason))
  if damaged:
    raise CheckpointError(
        f'every checkpoint in {mngr.directory} is damaged ({len(damaged)} steps, moved to '
        f'checkpoints_damaged/): {damaged}. Delete the workdir to start afresh.')
  return None


def flatten_state(tree: dict, prefix: tuple = ()) -> dict:
  """Nested dict -> {path of str: leaf}; orbax's {'value': array} leaf wrappers removed."""
  out = {}
  for k, v in tree.items():
    path = prefix + (str(k),)
    if isinstance(v, dict) and set(v) == {'value'} and not isinstance(v['value'], dict):
      out[path] = v['value']
    elif isinstance(v, dict):
      out.update(flatten_state(v, path))
    else:
      out[path] = v
  return out


def unflatten_like(tree: dict, flat: dict, prefix: tuple = ()) -> dict:
  """The nested dict `tree` with each leaf replaced by `flat[its path]` (flatten_state's
  inverse, shaped like `tree`)."""
  return {k: (unflatten_like(v, flat, prefix + (str(k),)) if isinstance(v, dict)
              else flat[prefix + (str(k),)]) for k, v in tree.items()}


def read_model_variables(workdir: str, step: int | None = None) -> dict | None:
  """{path: np.ndarray} of the model part of a workdir's checkpoint (latest by default),
  read without building the model; None when the workdir holds no checkpoint. Reads
  only: creates and cleans up nothing."""
  path = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(path):
    return None
  mngr = ocp.CheckpointManager(path, item_names=ITEMS)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      return None
    raw = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                     meta=ocp.args.JsonRestore()))
  finally:
    mngr.close()
  model = raw.state['0'] if '0' in raw.state else raw.state[0]   # state = (model, optimizer)
  return {p: np.asarray(jax.random.key_data(v) if is_key(v) else v)
          for p, v in flatten_state(model).items()}


def is_key(v) -> bool:
  """Whether `v` is a typed JAX random key (stored by orbax as raw key data)."""
  return hasattr(v, 'dtype') and jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)


def read_latest_meta(workdir: str) -> dict | None:
  """The JSON item of a workdir's latest checkpoint (data position, timers, config)."""
  path = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(path):
    return None
  mngr = ocp.CheckpointManager(path, item_names=ITEMS,
                               item_handlers={'meta': ocp.JsonCheckpointHandler()})
  try:
    step = mngr.latest_step()
    return None if step is None else read_meta(mngr, step)
  finally:
    mngr.close()

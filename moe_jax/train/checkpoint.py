"""orbax checkpoints: train state plus a JSON item with the data position and timers.

    mngr = make_manager(workdir, every=500, keep=3)
    restored = restore_latest(mngr, state)          # None on a fresh workdir
    if restored: state, meta = restored
    save(mngr, step, state, meta, force=False)      # call EVERY step; the policy decides

Saves are atomic (orbax writes a temporary directory and renames it when complete;
`latest_step` ignores unfinished ones) and asynchronous.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def make_manager(workdir: str, *, every: int, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                           cleanup_tmp_directories=True),
      item_names=('state', 'meta'))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict, *, force: bool = False) -> bool:
  """Offers step `step` to the manager (saved on its interval, on preemption, or when forced)."""
  return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave(meta)), force=force)


def restore(mngr: ocp.CheckpointManager, step: int, target) -> tuple:
  """Restores step `step` into the structure, shapes and shardings of `target` -> (state, meta)."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  r = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                 meta=ocp.args.JsonRestore()))
  return r.state, r.meta


def restore_latest(mngr: ocp.CheckpointManager, target) -> tuple | None:
  """(state, meta) of the latest complete checkpoint, or None when there is none."""
  step = mngr.latest_step()
  if step is None:
    return None
  return restore(mngr, step, target)

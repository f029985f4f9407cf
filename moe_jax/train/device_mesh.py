"""The trainer on a device mesh: mesh from `config.mesh`, state and batch placement.

    mesh = trainer_mesh(config)                # None: one device, no mesh
    with mesh_context(mesh):                   # MoeLayers trace expert-parallel inside
      place_state(mesh, model, optimizer)      # experts over `expert`, the rest replicated
      state, metrics = train_step(state, put_batch(mesh, host_batch))

`config.mesh` all 1 (the default) on one process trains on one device exactly as
before. Any other mesh spans `jax.device_count()` devices (all processes' devices after
`parallel.initialize_distributed()`); each process feeds its own rows of every batch
(the task's data yields them) and `put_batch` assembles the global array split over
(`data`, `expert`). (`moe_jax.parallel.sharding` holds the sharding rules themselves.) Checkpoints hold global arrays: orbax writes each process's shards
and restores onto the shardings of the target, so a run can resume on another mesh.
"""
from __future__ import annotations

import contextlib

import jax
import ml_collections
from flax import nnx

from moe_jax import parallel
from moe_jax.errors import ConfigError
from moe_jax.layers import MoeLayer


def trainer_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh | None:
  """`parallel.make_mesh(config.mesh)`, or None for a single-device run.

  Raises a ConfigError that says what to change when the mesh does not match the device
  count or the train / eval batch does not split over the (`data`, `expert`) devices
  (`check_model_fits` checks the experts once the model is built).
  """
  sizes = {a: int(config.mesh.get(a, 1)) for a in parallel.MESH_AXES}
  if all(s == 1 for s in sizes.values()) and jax.process_count() == 1:
    return None
  try:
    mesh = parallel.make_mesh(config.mesh)
  except ValueError as e:
    raise ConfigError(f'{e} (set --config.mesh.data / --config.mesh.expert / '
                      f'--config.mesh.model; {jax.process_count()} process(es), '
                      f'{jax.device_count()} devices)', field='config.mesh') from None
  shards = parallel.num_batch_shards(mesh)
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % shards:
      raise ConfigError(
          f'{config[field]} does not split over the {shards} batch shards of the mesh '
          f"(data={mesh.shape['data']} x expert={mesh.shape['expert']}); use a multiple of "
          f'{shards}.', field=f'config.{field}')
  return mesh


def check_model_fits(mesh, model) -> None:
  """Every MoE layer's experts split over the mesh's `expert` axis (ConfigError if not)."""
  if mesh is None:
    return
  n_exp = mesh.shape[parallel.EXPERT]
  for path, m in nnx.iter_graph(model):
    if isinstance(m, MoeLayer) and m.num_experts % n_exp:
      name = m.context.name or '/'.join(map(str, path))
      raise ConfigError(
          f'the MoE layer {name} has {m.num_experts} experts, which do not split over the '
          f'expert mesh axis of size {n_exp}; use a multiple of {n_exp} experts or change '
          'config.mesh.expert.', field='config.mesh.expert')


def mesh_context(mesh):
  """`jax.set_mesh(mesh)`, or nothing when `mesh` is None."""
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def place_state(mesh, *modules) -> None:
  """Moves every Variable of the modules / optimizers onto `mesh` (in place); None: no-op."""
  if mesh is not None:
    for m in modules:
      parallel.shard_module(m, mesh)


def put_batch(mesh, batch: dict) -> dict:
  """This process's rows of a batch -> global arrays split over (`data`, `expert`)."""
  return batch if mesh is None else parallel.shard_batch(batch, mesh)

"""Parameter and batch shardings.

Rule: expert parameters `[E, ...]` are split over the `expert` mesh axis (and their
hidden axis h over `model`); every other parameter and state is replicated; batches
are split over (`data`, `expert`) on their leading axis.

Expert parameters carry the rule as NNX `out_sharding` metadata (mesh axis names, e.g.
`('expert', None, 'model')` for `w_in [E, d, h]`), so optimizer states inherit it and
`nnx.get_partition_spec` sees it. They are placed on the mesh when built under
`jax.set_mesh(mesh)`; a model built without a mesh is moved onto one by `shard_module`.
Axis names that a mesh lacks are dropped (replicated), so the same model can go on any
mesh, with or without a `model` axis, and on no mesh at all.

The trainer needs (phase 2):

    mesh = parallel.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
      model = build_model(...)                 # or: model = parallel.shard_module(model, mesh)
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)   # inherits the shardings
      batch = parallel.shard_batch(host_batch, mesh)       # host-local numpy -> global array
      target = parallel.abstract_state(nnx.state(optimizer), mesh)   # restore on ANY mesh
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax.parallel import mesh as mesh_lib


def _axis_sizes(mesh) -> dict[str, int]:
  return dict(zip(mesh.axis_names, mesh.axis_sizes))


def fit_spec(spec, shape: tuple[int, ...], mesh, *, what: str = 'array') -> P:
  """`spec` (tuple of axis names / None / tuples) restricted to the axes `mesh` has.

  Axes of size 1 are dropped too (no sharding, and no collective over them).
  Raises a clear error when a dimension does not divide over its mesh axes.
  """
  if not spec:
    return P()
  sizes = _axis_sizes(mesh)
  out = []
  for dim, entry in enumerate(spec):
    names = entry if isinstance(entry, tuple) else (entry,)
    names = tuple(n for n in names if n is not None and sizes.get(n, 1) > 1)
    parts = int(np.prod([sizes[n] for n in names])) if names else 1
    if names and shape[dim] % parts:
      hint = (' choose num_experts as a multiple of the expert axis, or change config.mesh.expert'
              if names == (mesh_lib.EXPERT,) and dim == 0 else
              ' change that size or the mesh sizes (config.mesh)')
      raise ValueError(f'{what} of shape {tuple(shape)}: dimension {dim} (size {shape[dim]}) does '
                       f'not divide over mesh axes {names} of total size {parts};{hint}.')
    out.append(None if not names else names[0] if len(names) == 1 else names)
  return P(*out)


def place(value: jax.Array, spec, *, what: str = 'parameter') -> jax.Array:
  """Shards `value` by `spec` on the mesh set by `jax.set_mesh`; no mesh: unchanged.

  Inside `shard_map` (manual axes) the value is left alone: it is already local.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.manual_axes:
    return value
  pspec = fit_spec(spec, value.shape, mesh, what=what)
  if mesh.are_all_axes_explicit:
    return jax.sharding.reshard(value, pspec)
  return jax.lax.with_sharding_constraint(value, pspec)


def sharded_param(value: jax.Array, spec: tuple | None, *, what: str = 'parameter') -> nnx.Param:
  """An `nnx.Param` with `out_sharding=spec` metadata, placed on the active mesh if any.

  `spec=None`: a plain replicated parameter.

  Flax's own eager sharding would fail without a mesh or on a mesh that lacks one of
  the axes; `place` handles both, so it is switched off.
  """
  if spec is None:
    return nnx.Param(value)
  return nnx.Param(place(value, spec, what=what), out_sharding=spec, eager_sharding=False)


def _variable_spec(v: Any, mesh) -> P:
  if not isinstance(v, nnx.Variable):
    return P()
  spec = v.get_metadata().get('out_sharding')
  return fit_spec(spec, np.shape(v.get_value()), mesh, what=type(v).__name__)


def partition_specs(tree: Any, mesh) -> Any:
  """The PartitionSpec of every Variable of `tree` (a module or `nnx.State`) on `mesh`.

  Same structure as `nnx.state(tree)`: annotated expert parameters and their optimizer
  states get their annotation (fitted to `mesh`), everything else `P()`.
  """
  state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
  return jax.tree.map(lambda v: v.replace(_variable_spec(v, mesh)), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def named_shardings(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """`partition_specs` as `NamedSharding`s on the concrete `mesh`."""
  specs = partition_specs(tree, mesh)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def shard_module(module: Any, mesh: jax.sharding.Mesh) -> Any:
  """Moves every Variable of an NNX module or optimizer onto `mesh`, in place.

  Every process must hold the same values (same seed), as in `jax.device_put`.
  Returns `module` for chaining.
  """
  state = nnx.state(module)
  nnx.update(module, jax.device_put(state, named_shardings(state, mesh)))
  return module


def abstract_state(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """`jax.ShapeDtypeStruct`s with this mesh's shardings, for restoring a checkpoint.

  `tree` is a module, an optimizer or their `nnx.State`, concrete or abstract
  (`nnx.eval_shape`). The checkpoint may have been written on any other mesh:

      target = abstract_state(nnx.state(optimizer), new_mesh)
      restored = manager.restore(step, args=ocp.args.StandardRestore(target))
      nnx.update(optimizer, restored)
  """
  state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
  shardings = named_shardings(state, mesh)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s),
                      state, shardings)


def shard_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Host-local batch (pytree of arrays `[b_local, ...]`) -> global arrays on `mesh`.

  Leading axes are split over (`data`, `expert`). On several processes every process
  passes its own slice (`b_local = global_batch / jax.process_count()`).
  """
  shards = mesh_lib.num_batch_shards(mesh)

  def put(x):
    x = np.asarray(x)
    global_b = x.shape[0] * jax.process_count()
    if global_b % shards:
      raise ValueError(
          f'a global batch of {global_b} examples does not split over the {shards} batch shards '
          f'of the mesh ({dict(zip(mesh.axis_names, mesh.axis_sizes))}, batch over '
          f'{mesh_lib.batch_axes(mesh)}); use a batch size that is a multiple of {shards}.')
    spec = mesh_lib.batch_spec(mesh, x.ndim)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)

  return jax.tree.map(put, batch)

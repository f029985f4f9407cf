"""Device mesh from config: axes `data`, `expert` and `model`.

    config.mesh = ml_collections.ConfigDict(dict(data=-1, expert=4, model=1))
    mesh = parallel.make_mesh(config.mesh)      # jax.make_mesh((2, 4, 1), MESH_AXES)
    with jax.set_mesh(mesh):
      ...                                      # MoeLayer runs expert-parallel here

* `data`: pure data parallelism (batch split, every parameter replicated);
* `expert`: experts split over it (each device holds E / |expert| experts); the batch
  is split over it too, so every device routes its own tokens;
* `model`: tensor parallelism inside the experts (their hidden axis h is split).

The batch is split over (`data`, `expert`) and replicated over `model`. The mesh always
has the three axes (size 1 allowed), so parameter annotations can name all of them.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
from jax.sharding import AxisType, PartitionSpec as P

DATA, EXPERT, MODEL = 'data', 'expert', 'model'
MESH_AXES = (DATA, EXPERT, MODEL)
BATCH_AXES = (DATA, EXPERT)

_AXIS_TYPES = {'explicit': AxisType.Explicit, 'auto': AxisType.Auto}


def _get(config: Any, name: str, default):
  if config is None:
    return default
  if isinstance(config, Mapping):
    return config.get(name, default)
  return getattr(config, name, default)


def mesh_shape(config: Any = None, num_devices: int | None = None) -> tuple[int, int, int]:
  """(data, expert, model) sizes from `config` (a ConfigDict, dict or None).

  One size may be -1: it takes whatever the others leave of `num_devices` (default
  `jax.device_count()`, all devices of all processes). Missing keys default to
  data=-1, expert=1, model=1 (pure data parallelism).
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  sizes = [int(_get(config, DATA, -1)), int(_get(config, EXPERT, 1)), int(_get(config, MODEL, 1))]
  desc = ' × '.join(f'{n}={s}' for n, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.mesh {desc}: sizes must be >= 1, with at most one -1 '
                     '(meaning "all remaining devices").')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'config.mesh {desc}: {known} does not divide the {num_devices} '
                       f'available devices; change the mesh sizes.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'config.mesh {desc} needs {math.prod(sizes)} devices but '
                     f'{num_devices} are available (jax.device_count()); make the product '
                     'equal to the device count, or set one axis to -1 to fill it.')
  return tuple(sizes)


def make_mesh(config: Any = None, *, devices=None) -> jax.sharding.Mesh:
  """A (`data`, `expert`, `model`) mesh built with `jax.make_mesh`.

  Args:
    config: ConfigDict / dict / object with `data`, `expert`, `model` sizes (see
      `mesh_shape`) and optionally `axis_types`: 'explicit' (default, JAX's default:
      shardings are part of array types) or 'auto' (the compiler propagates them).
    devices: devices to use (default: all of them).
  """
  num = None if devices is None else len(devices)
  shape = mesh_shape(config, num)
  kind = str(_get(config, 'axis_types', 'explicit')).lower()
  if kind not in _AXIS_TYPES:
    raise ValueError(f"config.mesh.axis_types must be one of {sorted(_AXIS_TYPES)}, got {kind!r}.")
  return jax.make_mesh(shape, MESH_AXES, axis_types=(_AXIS_TYPES[kind],) * 3, devices=devices)


def axis_size(mesh, name: str) -> int:
  """Size of axis `name` of a (concrete or abstract) mesh, 1 when it has no such axis."""
  return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(name, 1)


def batch_axes(mesh) -> tuple[str, ...]:
  """The axes of `mesh` the batch is split over: (`data`, `expert`) where present."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def num_batch_shards(mesh) -> int:
  return math.prod(axis_size(mesh, a) for a in batch_axes(mesh))


def batch_spec(mesh, ndim: int = 1) -> P:
  """PartitionSpec of a batch-major array of rank `ndim`: dim 0 over the batch axes."""
  axes = batch_axes(mesh)
  return P(axes if axes else None, *([None] * (ndim - 1)))

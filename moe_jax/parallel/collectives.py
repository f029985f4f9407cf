"""Collectives of the expert-parallel MoE layer; safe to call outside `shard_map` too.

Inside the layer's `shard_map` every device sees only its own routing groups. Statistics
that routers compute from "the batch" must then be reduced over the batch axes
(`data`, `expert`) to equal the single-device values:

* `global_mean(x)` / `global_sum(x)`: pmean / psum over the batch axes that are manual
  in the current context (inside the layer's shard_map), identity otherwise (single
  device, or a plain `jax.jit` where arrays are already global).

Routers that write non-gradient state in their forward pass (e.g. DeepSeek's expert
counts, which its `after_step` turns into a bias update) MUST write it from
`global_mean(...)` / `global_sum(...)` of their per-group statistics: then it is
identical on every device and the layer can return it as replicated state. State from
local statistics differs per device and the layer rejects it (`expert_parallel`).

    counts = parallel.global_sum(jnp.sum(assigned, axis=(0, 1)))   # [E], same everywhere
    self.expert_counts[...] = self.expert_counts[...] + counts
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from moe_jax.parallel import mesh as mesh_lib

Array = jax.Array


def batch_axes_in_context() -> tuple[str, ...]:
  """The batch axes (`data`, `expert`) that are manual here, i.e. split over devices."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  manual = set(mesh.manual_axes)
  return tuple(a for a in mesh_lib.BATCH_AXES if a in manual)


def global_mean(x: Any) -> Any:
  """Mean over all devices' routing groups of a per-device mean (pytree of arrays).

  Exact when every device holds the same number of groups (the layer checks that the
  batch divides over the devices).
  """
  axes = batch_axes_in_context()
  if not axes:
    return x
  return jax.tree.map(lambda v: lax.pmean(v, axes), x)


def global_sum(x: Any) -> Any:
  """Sum over all devices (pytree of arrays); identity outside shard_map."""
  axes = batch_axes_in_context()
  if not axes:
    return x
  return jax.tree.map(lambda v: lax.psum(v, axes), x)


def global_max(x: Any) -> Any:
  """Max over all devices (pytree of arrays); identity outside shard_map."""
  axes = batch_axes_in_context()
  if not axes:
    return x
  return jax.tree.map(lambda v: lax.pmax(v, axes), x)


# Metrics that are maxima over the tokens (not means): reduced with a max over devices.
MAX_METRICS = ('router_logit_max',)


def expert_all_to_all(expert_fn: Callable[[Array], Array], axis: str = mesh_lib.EXPERT
                      ) -> Callable[[Array], Array]:
  """Wraps a local expert function `[E/n, N', d] -> [E/n, N', d']` into `[E, N, d] -> [E, N, d']`.

  `all_to_all` over `axis` (size n) sends the slots of expert e to the device that holds
  it: device j receives `[E/n, n·N, d]`, its experts' slots from every device in device
  order; a second `all_to_all` returns the results to the devices that own the tokens.
  """
  def fn(buf: Array) -> Array:
    buf = lax.all_to_all(buf, axis, split_axis=0, concat_axis=1, tiled=True)
    out = expert_fn(buf)
    return lax.all_to_all(out, axis, split_axis=1, concat_axis=0, tiled=True)
  return fn


def _processed_mass(r) -> Array:
  """Total (token, slot) weight this device's routing processed (expert_load's denominator)."""
  if r.is_sparse:
    return jnp.sum(r.slot_token < r.num_tokens).astype(jnp.float32)
  return jnp.sum(r.dispatch_weights.astype(jnp.float32))


def global_routing_stats(r) -> dict:
  """`{'losses': ..., 'metrics': ...}` of a local `Routing`, reduced over all devices.

  Aux losses and metrics are means over routing groups (or tokens), so their pmean is the
  single-device value. `expert_load` is normalised per device, so it is averaged with
  the weight of each device's processed mass, which makes it exact too.
  `dropped_fraction` is exact when every device requests the same number of
  assignments (all routers without a request mask). Maxima (`MAX_METRICS`) take the
  max over devices.
  """
  losses = global_mean(dict(r.aux_losses))
  metrics = {}
  for name, value in r.metrics.items():
    value = jnp.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.floating):
      value = value.astype(jnp.float32)
    if name == 'expert_load':
      mass = _processed_mass(r)
      metrics[name] = global_sum(value * mass) / jnp.maximum(global_sum(mass), 1e-9)
    elif name in MAX_METRICS:
      metrics[name] = global_max(value)
    else:
      metrics[name] = global_mean(value)
  return dict(losses=losses, metrics=metrics)

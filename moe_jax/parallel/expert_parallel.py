"""The MoE layer under a mesh: `jax.shard_map` over (`data`, `expert`, `model`).

Per device, inside the shard_map (the same code as on one device, on local groups):

    x_local [B/n_b, S, d]  -> router -> Routing of the local groups (groups are examples
                              or group_size-token chunks of local examples: never split)
    engine.dispatch        -> buf [E, G_local, C, d]
    all_to_all('expert')   -> [E/n_e, n_e·G_local·C, d]  this device's experts' slots
    experts (local shard)  -> partial sums over the `model` shard of h, psum('model')
    all_to_all('expert')   -> [E, G_local, C, d] back to the tokens' devices
    engine.combine         -> y_local [B/n_b, S, d]

with n_b = |data|·|expert| and n_e = |expert|. That is the form of engines with
`expert_parallel = 'buffer'` (einsum, gather). Engines with `expert_parallel = 'rows'`
(dropless) have no fixed-size buffer: they receive a `LocalExperts` instead of an expert
function and exchange their expert-sorted rows themselves (`parallel.ragged`:
ragged_all_to_all on GPU/TPU, a padded all_to_all on CPU). Aux losses and metrics are
reduced over
the batch axes (`collectives.global_routing_stats`), router parameters are replicated
(shard_map's check_vma sums their gradients over devices), non-gradient router state
must come out identical on every device (see `collectives.global_mean`), and logit-noise
keys are folded with the device's batch index so devices draw different noise.

The layer is used through its documented interface only: `router`, `experts` (an
`Experts` module: `params_dict`, `param_specs`, `apply_weights`, `hidden`), `engine`
(its `expert_parallel` form), `num_experts`, `group_size` and `route_and_apply`.
"""
from __future__ import annotations

import math

import jax
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from moe_jax.parallel import collectives
from moe_jax.parallel import mesh as mesh_lib
from moe_jax.parallel import sharding as sharding_lib


# An engine's `expert_parallel` form: 'buffer' (its [E, G, C, d] buffer, fixed C, is
# moved by all_to_all as is) or 'rows' (it takes a `LocalExperts` and exchanges
# variable-size row groups itself).
FORMS = ('buffer', 'rows')


class LocalExperts:
  """This device's experts inside the layer's shard_map, for engines of the 'rows' form.

  Attributes:
    num_experts: E, the global expert count (rows are sorted by global expert id).
    expert_axis: mesh axis the experts are split over, None when it has size 1.
    expert_axis_size: its size n.
    model_axis: mesh axis splitting the experts' hidden width (partial sums to psum),
      None when it has size 1.
    buffer_fn: `[E, N, d] -> [E, N, d]` with the all_to_all exchange, for routings that
      the engine hands to a buffer engine.
  """

  def __init__(self, experts, params: dict, buffer_fn, expert_axis, expert_axis_size: int,
               model_axis):
    self._experts, self._params, self.buffer_fn = experts, params, buffer_fn
    self.num_experts = experts.num_experts
    self.expert_axis, self.expert_axis_size = expert_axis, expert_axis_size
    self.model_axis = model_axis

  def params_dict(self) -> dict:
    """Local shards: leading axis E / n, hidden axis h / |model|."""
    return dict(self._params)

  def apply_grouped(self, params, x, group_sizes, **kwargs):
    """`Experts.apply_grouped` with this device's params."""
    return self._experts.apply_grouped(params, x, group_sizes, **kwargs)


def active_mesh():
  """The abstract mesh the MoE layer runs expert-parallel on, or None (single device).

  A mesh set by `jax.set_mesh` counts when it has some of the axes `data`, `expert`,
  `model` and they span more than one device.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  if math.prod(mesh_lib.axis_size(mesh, a) for a in mesh_lib.MESH_AXES) <= 1:
    return None
  return mesh


def check_layer_fits(layer, x_shape, mesh, *, local: bool = False) -> None:
  """Clear errors when the batch or the experts do not divide over the mesh.

  `local`: x is already one device's block (inside a shard_map).
  """
  if getattr(layer.engine, 'expert_parallel', None) not in FORMS:
    raise NotImplementedError(
        f'engine {layer.engine!r} has no expert-parallel form (`expert_parallel` one of '
        f'{FORMS}); under a mesh use einsum, gather or dropless.')
  n_batch = 1 if local else mesh_lib.num_batch_shards(mesh)
  if x_shape[0] % n_batch:
    raise ValueError(
        f'MoeLayer under a mesh: batch of {x_shape[0]} examples does not split over the '
        f'{n_batch} batch shards ({" × ".join(mesh_lib.batch_axes(mesh))} = {n_batch}); use a '
        f'batch size that is a multiple of {n_batch}.')
  n_exp = mesh_lib.axis_size(mesh, mesh_lib.EXPERT)
  if layer.num_experts % n_exp:
    raise ValueError(
        f'MoeLayer: num_experts={layer.num_experts} does not divide over the expert mesh axis '
        f'of size {n_exp}; use a multiple of {n_exp} experts or change config.mesh.expert.')
  n_model = mesh_lib.axis_size(mesh, mesh_lib.MODEL)
  if layer.experts.hidden % n_model:
    raise ValueError(
        f'MoeLayer: expert_hidden={layer.experts.hidden} does not divide over the model mesh '
        f'axis of size {n_model}; change expert_hidden or config.mesh.model.')
  if layer.group_size is not None and (x_shape[0] // n_batch * x_shape[1]) % layer.group_size:
    raise ValueError(
        f'MoeLayer: group_size={layer.group_size} does not divide the '
        f'{x_shape[0] // n_batch}x{x_shape[1]} tokens of each device, so routing groups '
        'would straddle devices; change group_size or the batch size.')


def _fold_keys(state, index):
  """Folds `index` into every RNG key of a router state (decorrelates devices' noise)."""
  return jax.tree.map(
      lambda v: v.replace(jax.random.fold_in(v.get_value(), index)) if isinstance(v, nnx.RngKey)
      else v, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def _restore_keys(new_state, old_state):
  return jax.tree.map(
      lambda new, old: old if isinstance(new, nnx.RngKey) else new, new_state, old_state,
      is_leaf=lambda v: isinstance(v, nnx.Variable))


def _check_replicated(state, axes) -> None:
  """Router state leaving the shard_map must be the same on every device."""
  for path, v in jax.tree_util.tree_leaves_with_path(state):
    varying = getattr(getattr(jax.typeof(v), 'manual_axis_type', None), 'varying', ())
    if set(varying) & set(axes):
      raise ValueError(
          f'router state {jax.tree_util.keystr(path)} differs between devices under expert '
          'parallelism: a router must update non-parameter state from batch statistics '
          'reduced with moe_jax.parallel.global_mean / global_sum, so that every device '
          'computes the same update.')


def moe_layer_apply(layer, x, token_ids, mesh):
  """The expert-parallel forward of `MoeLayer`: x [B, S, d] -> (y [B, S, d], aux).

  Called by `MoeLayer.__call__` when `active_mesh()` is not None; also works when the
  caller is already inside a shard_map over these axes (no second shard_map).
  """
  axes = tuple(a for a in mesh_lib.MESH_AXES if a in mesh.axis_names)
  inside = set(axes) <= set(mesh.manual_axes)   # already inside a shard_map over these axes
  check_layer_fits(layer, x.shape, mesh, local=inside)
  batch = mesh_lib.batch_axes(mesh)
  n_exp = mesh_lib.axis_size(mesh, mesh_lib.EXPERT)
  has_model = mesh_lib.axis_size(mesh, mesh_lib.MODEL) > 1
  graphdef, params, state = nnx.split(layer.router, nnx.Param, ...)
  expert_params = layer.experts.params_dict()     # local shards when `inside`

  def local_experts(eparams, buf):
    """buf [E/n_e, N, d] -> [E/n_e, N, d] with this device's experts (and h shard)."""
    eparams = dict(eparams)
    b_out = eparams.pop('b_out', None)
    out = layer.experts.apply_weights(eparams, buf)
    if has_model:                 # each model shard holds a slice of h: partial sums
      out = lax.psum(out, mesh_lib.MODEL)
    if b_out is not None:
      out = out + b_out.astype(out.dtype)[:, None, :]
    return out

  def body(x, token_ids, params, state, eparams):
    index = lax.axis_index(batch) if batch else 0
    router = nnx.merge(graphdef, params, _fold_keys(state, index))
    expert_fn = lambda buf: local_experts(eparams, buf)
    if n_exp > 1:
      expert_fn = collectives.expert_all_to_all(expert_fn)
    if layer.engine.expert_parallel == 'rows':
      expert_fn = LocalExperts(layer.experts, eparams, expert_fn,
                               mesh_lib.EXPERT if n_exp > 1 else None, n_exp,
                               mesh_lib.MODEL if has_model else None)
    y, r = layer.route_and_apply(x, token_ids, router, expert_fn)
    _, _, new_state = nnx.split(router, nnx.Param, ...)
    new_state = _restore_keys(new_state, state)
    _check_replicated(new_state, batch)
    return y, collectives.global_routing_stats(r), new_state

  args = (x, token_ids, params, state, expert_params)
  if inside:
    y, aux, new_state = body(*args)
  else:
    x_spec = mesh_lib.batch_spec(mesh, x.ndim)
    ids_spec = None if token_ids is None else mesh_lib.batch_spec(mesh, token_ids.ndim)
    annotations = layer.experts.param_specs()
    expert_specs = {n: sharding_lib.fit_spec(annotations[n], v.shape, mesh, what=f'experts.{n}')
                    for n, v in expert_params.items()}
    in_specs = (x_spec, ids_spec, P(), P(), expert_specs)
    if mesh.are_all_axes_explicit:   # Explicit meshes: shard_map inputs must match in_specs
      args = tuple(a if s is None else jax.tree.map(lambda v, s=s: jax.sharding.reshard(v, s), a)
                   for a, s in zip(args, in_specs[:4])) + (
                       {n: jax.sharding.reshard(v, expert_specs[n]) for n, v in args[4].items()},)
    # jit: an eager shard_map would run op by op on every device (slow); inside an outer
    # jit this one is inlined.
    fn = jax.jit(jax.shard_map(body, in_specs=in_specs, out_specs=(x_spec, P(), P()),
                               axis_names=set(axes)))
    y, aux, new_state = fn(*args)
  nnx.update(layer.router, new_state)
  return y, aux

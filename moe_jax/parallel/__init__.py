"""Expert parallelism: mesh from config, shardings, the sharded MoE layer, collectives.

    mesh = parallel.make_mesh(config.mesh)       # axes ('data', 'expert', 'model')
    with jax.set_mesh(mesh):
      model = parallel.shard_module(build_model(), mesh)   # experts over 'expert'
      batch = parallel.shard_batch(host_batch, mesh)       # batch over ('data', 'expert')
      y, aux = jax.jit(lambda m, x: m(x))(model, batch)    # MoeLayer runs expert-parallel

Imports jax and flax only (never moe_jax.layers: the layers import this package).
"""
from moe_jax.parallel.collectives import (batch_axes_in_context, expert_all_to_all,
                                          global_mean, global_routing_stats, global_sum)
from moe_jax.parallel.distributed import initialize_distributed
from moe_jax.parallel.expert_parallel import active_mesh, moe_layer_apply
from moe_jax.parallel.mesh import (BATCH_AXES, DATA, EXPERT, MESH_AXES, MODEL, batch_axes,
                                   batch_spec, make_mesh, mesh_shape, num_batch_shards)
from moe_jax.parallel.sharding import (abstract_state, fit_spec, named_shardings,
                                       partition_specs, place, shard_batch, shard_module,
                                       sharded_param)
from moe_jax.parallel.ragged import RaggedPlan, ragged_dispatch, ragged_return

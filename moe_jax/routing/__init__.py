"""Pure routing math: logits -> `Routing`. Imports jax only (no Flax, no TensorFlow).

One file per router family. The families with a short public entry point are imported
here; the others are used through their modules (`routing.dselect_k.dselect_k`,
`routing.experts_choice_capped.experts_choice_capped`, `routing.base_layers`, ...), so
that no function shadows a module name.
"""
from moe_jax.routing import base_layers, hashing, sinkhorn
from moe_jax.routing.assign import assign_slots
from moe_jax.routing.capacity import CapacitySpec, compute_capacity
from moe_jax.routing.experts_choice import experts_choice
from moe_jax.routing.losses import (cv_squared, importance_loss, load_balancing_loss,
                                    router_z_loss)
from moe_jax.routing.metrics import dense_metrics, entropy, sparse_metrics
from moe_jax.routing.reinforce import reinforce_routing, reinforce_surrogate, update_baseline
from moe_jax.routing.soft import soft_moe
from moe_jax.routing.soft_causal import soft_moe_causal
from moe_jax.routing.tokens_choice import finish_token_routing, tokens_choice
from moe_jax.routing.types import Routing

__all__ = [
    'CapacitySpec', 'Routing', 'assign_slots', 'compute_capacity', 'cv_squared',
    'dense_metrics', 'entropy', 'experts_choice', 'finish_token_routing', 'importance_loss',
    'load_balancing_loss', 'reinforce_routing', 'reinforce_surrogate', 'router_z_loss',
    'soft_moe', 'soft_moe_causal', 'sparse_metrics', 'tokens_choice', 'update_baseline',
]

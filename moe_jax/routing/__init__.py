"""Pure routing math: logits -> `Routing`. Imports jax only (no Flax, no TensorFlow)."""
from moe_jax.routing import base, hashing, sinkhorn   # BASE, Hash layers, S-BASE (catalogue B)
from moe_jax.routing.assign import assign_slots
from moe_jax.routing.capacity import compute_capacity
from moe_jax.routing.experts_choice import experts_choice
from moe_jax.routing.losses import (cv_squared, importance_loss, load_balancing_loss,
                                    router_z_loss)
from moe_jax.routing.metrics import dense_metrics, entropy, sparse_metrics
from moe_jax.routing.soft import soft_moe
from moe_jax.routing.tokens_choice import finish_token_routing, tokens_choice
from moe_jax.routing.types import Routing

__all__ = [
    'Routing', 'assign_slots', 'compute_capacity', 'cv_squared', 'dense_metrics', 'entropy',
    'experts_choice', 'finish_token_routing', 'importance_loss', 'load_balancing_loss',
    'router_z_loss', 'soft_moe', 'sparse_metrics', 'tokens_choice',
]

# Catalogue C. DSelect-k and EC-CAP are used through their modules
# (`routing.dselect_k`, `routing.experts_choice_capped`) so that no function shadows them.
from moe_jax.routing.reinforce import (reinforce_routing, reinforce_surrogate,  # noqa: E402
                                       update_baseline)
from moe_jax.routing.soft_causal import soft_moe_causal  # noqa: E402

__all__ += ['reinforce_routing', 'reinforce_surrogate', 'soft_moe_causal', 'update_baseline']

"""Switch top-1 router (Fedus et al. 2021) and its straight-through variant (Bengio et al.
2013); registry names 'switch' and 'straight_through'."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.moe_config import LayerContext
from moe_jax.layers.routers.base import Router
from moe_jax.routing import CapacitySpec, Routing
from moe_jax.routing.switch import multiplicative_jitter, switch_top1


class SwitchRouter(Router):
  """Top-1 with the raw softmax gate p_{i*}, capacity 1.25 train / 2.0 eval. Causal.

  router_kwargs:
    capacity keywords: capacity_factor 1.25 (paper §2.2), eval_capacity_factor 2.0 (paper).
    jitter_eps: multiplicative input jitter ε on the router input, training only
      (default 1e-2, the paper's best exploration policy and mesh-tf's default; 0 turns
      it off, as flaxformer / T5X and ST-MoE do).
    init_scale: router init, truncated normal std sqrt(init_scale/d) (paper: 0.1).
    and load_balance_weight (α = 1e-2), z_loss_weight (0) of `routing.switch.switch_top1`.
  """
  routing_fn = staticmethod(switch_top1)
  set_by_router = ('straight_through',)
  default_capacity = CapacitySpec(capacity_factor=1.25, eval_capacity_factor=2.0)
  straight_through = False
  default_jitter_eps = 1e-2

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs,
               context: LayerContext | None = None, jitter_eps: float | None = None,
               init_scale: float = 0.1, **kwargs):
    name = 'straight_through' if self.straight_through else 'switch'
    jitter_eps = self.default_jitter_eps if jitter_eps is None else jitter_eps
    if not 0.0 <= jitter_eps < 1.0:
      raise ValueError(f'{name}: jitter_eps must be in [0, 1), got {jitter_eps}.')
    super().__init__(d_model, num_experts, rngs=rngs, context=context, kwargs=kwargs,
                     gate_init_scale=init_scale, stochastic=bool(jitter_eps))
    self.jitter_eps = jitter_eps

  def __call__(self, x: jax.Array, *, token_ids: jax.Array | None = None) -> Routing:
    """x: [G, S, d] -> Routing."""
    x = x.astype(jnp.float32)
    if self.jitter_eps and not self.deterministic:
      x = multiplicative_jitter(x, self.rngs(), self.jitter_eps)
    return switch_top1(self.gate(x), straight_through=self.straight_through,
                       capacity=self.slots(x.shape[1]), **self.routing_kwargs)


class StraightThroughRouter(SwitchRouter):
  """Top-1 with a straight-through gate: forward weight 1 (y = E_{i*}(x), hard one-hot
  routing), backward as if the weight were p_{i*} (w = p + sg(1 − p)); see
  `routing/switch.py` for the exact estimator. Same options and defaults as 'switch'
  (capacity 1.25 / 2.0, balance loss 1e-2) except `jitter_eps=0`: Bengio et al.'s ST
  estimator is deterministic. Causal.
  """
  straight_through = True
  default_jitter_eps = 0.0

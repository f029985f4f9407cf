"""GShard top-2 router (Lepikhin et al. 2020), registry name 'gshard_top2'."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.moe_config import LayerContext
from moe_jax.layers.routers.base import Router
from moe_jax.routing import CapacitySpec, Routing
from moe_jax.routing.gshard import RENORMALIZE, SECOND_POLICIES, gshard_top2


class GShardTop2Router(Router):
  """Softmax top-2 with renormalised gates and random second-expert dispatch.

  Training follows Algorithm 1 of the paper: the second expert gets the token with
  probability min(1, 2·g2). Evaluation is deterministic by default
  (`eval_second_policy='all'`: every second choice is dispatched), because our layers
  sample only in training; mesh-tf keeps 'random' at evaluation, which
  `eval_second_policy='random'` reproduces (eval then draws from the router's rng
  stream). Causal.

  router_kwargs:
    second_policy: 'random' (default, paper), 'threshold', 'all', 'none' (training).
    eval_second_policy: the policy at evaluation (default 'all').
    second_threshold: 'random' dispatches iff U < g2/threshold (default 0.5 = the paper's
      2·g2 > U; mesh-tf 0.2); 'threshold' dispatches iff g2 > threshold (default 0.2).
    renormalize: 'before' (default; paper, mesh-tf) or 'after' (lingvo, fairseq) the drops.
    capacity keywords: capacity_factor 1.0 gives C = ceil(2·S·cf/E) = the paper's 2S/E
      (k = 2 multiplied in); eval: as training.
    init_scale: router init (Switch truncated normal, std sqrt(0.1/d)).
    and load_balance_weight (1e-2), z_loss_weight (0) of `routing.gshard.gshard_top2`
    (second_threshold too: passed through).
  """
  routing_fn = staticmethod(gshard_top2)
  set_by_router = ('uniform',)
  default_capacity = CapacitySpec(capacity_factor=1.0)

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs,
               context: LayerContext | None = None, second_policy: str = 'random',
               eval_second_policy: str = 'all', renormalize: str = 'before',
               init_scale: float = 0.1, **kwargs):
    if num_experts < 2:
      raise ValueError(f'gshard_top2 needs num_experts >= 2, got {num_experts}.')
    for name, policy in (('second_policy', second_policy),
                         ('eval_second_policy', eval_second_policy)):
      if policy not in SECOND_POLICIES:
        raise ValueError(f'gshard_top2: {name} must be one of {SECOND_POLICIES}, got {policy!r}.')
    if renormalize not in RENORMALIZE:
      raise ValueError(f'gshard_top2: renormalize must be one of {RENORMALIZE}, '
                       f'got {renormalize!r}.')
    super().__init__(d_model, num_experts, rngs=rngs, context=context, kwargs=kwargs,
                     gate_init_scale=init_scale,
                     stochastic='random' in (second_policy, eval_second_policy))
    self.second_policy, self.eval_second_policy = second_policy, eval_second_policy
    self.renormalize = renormalize

  def __call__(self, x: jax.Array, *, token_ids: jax.Array | None = None) -> Routing:
    """x: [G, S, d] -> Routing."""
    logits = self.gate(x)
    policy = self.eval_second_policy if self.deterministic else self.second_policy
    uniform = None
    if policy == 'random':
      uniform = jax.random.uniform(self.rngs(), logits.shape[:2], jnp.float32)
    return gshard_top2(logits, uniform=uniform, second_policy=policy, renormalize=self.renormalize,
                       capacity=self.slots(x.shape[1], k=2), **self.routing_kwargs)

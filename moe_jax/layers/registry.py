"""The one router registry: config name -> router module class.

Configs and `MoeLayer(router=...)` name routers by these keys; nothing is evaluated
from strings. A new router adds one import and one line here.
"""
from __future__ import annotations

from moe_jax.layers.routers import ExpertsChoiceRouter, SoftMoeRouter, TokensChoiceRouter
from moe_jax.layers.routers_base import BaseRouter
from moe_jax.layers.routers_hash import HashRouter
from moe_jax.layers.routers_sinkhorn import SinkhornBaseRouter
from moe_jax.layers.routers_deepseek import DeepSeekRouter
from moe_jax.layers.routers_gshard import GShardTop2Router
from moe_jax.layers.routers_noisy_top_k import NoisyTopKRouter
from moe_jax.layers.routers_switch import StraightThroughRouter, SwitchRouter
from moe_jax.layers.routers_dselect_k import DSelectKRouter
from moe_jax.layers.routers_experts_choice_capped import ExpertsChoiceCappedRouter
from moe_jax.layers.routers_reinforce import ReinforceRouter
from moe_jax.layers.routers_soft_causal import SoftMoeCausalRouter

ROUTERS = {
    'tokens_choice': TokensChoiceRouter,
    'experts_choice': ExpertsChoiceRouter,
    'soft_moe': SoftMoeRouter,
    'hash': HashRouter,
    'base': BaseRouter,
    'sinkhorn_base': SinkhornBaseRouter,
    'noisy_top_k': NoisyTopKRouter,
    'gshard_top2': GShardTop2Router,
    'switch': SwitchRouter,
    'straight_through': StraightThroughRouter,
    'deepseek': DeepSeekRouter,
    'dselect_k': DSelectKRouter,
    'experts_choice_capped': ExpertsChoiceCappedRouter,
    'reinforce': ReinforceRouter,
    'soft_moe_causal': SoftMoeCausalRouter,
}


def get_router_class(name: str):
  if name not in ROUTERS:
    raise ValueError(f'unknown router {name!r}; choose one of {sorted(ROUTERS)}.')
  return ROUTERS[name]

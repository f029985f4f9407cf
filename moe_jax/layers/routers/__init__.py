"""Router modules on one `Router` base, and the registry: config name -> router class.

One module per router family, named as its routing file in `moe_jax.routing`. Configs
and `MoeLayer(router=...)` name routers by the keys of `ROUTERS`; nothing is evaluated
from strings. A new router is its routing file (`routing/<family>.py`), its module file
here (a `Router` subclass) and one line in `ROUTERS`.
"""
from __future__ import annotations

from moe_jax.layers.routers.base import LinearGate, Router
from moe_jax.layers.routers.base_layers import BaseLayersRouter
from moe_jax.layers.routers.deepseek import DeepSeekRouter
from moe_jax.layers.routers.dselect_k import DSelectKRouter
from moe_jax.layers.routers.experts_choice import ExpertsChoiceRouter
from moe_jax.layers.routers.experts_choice_capped import ExpertsChoiceCappedRouter
from moe_jax.layers.routers.gshard import GShardTop2Router
from moe_jax.layers.routers.hashing import HashRouter
from moe_jax.layers.routers.noisy_top_k import NoisyTopKRouter
from moe_jax.layers.routers.reinforce import ReinforceRouter
from moe_jax.layers.routers.sinkhorn import SinkhornBaseRouter
from moe_jax.layers.routers.soft import SoftMoeRouter
from moe_jax.layers.routers.soft_causal import SoftMoeCausalRouter
from moe_jax.layers.routers.switch import StraightThroughRouter, SwitchRouter
from moe_jax.layers.routers.tokens_choice import TokensChoiceRouter

ROUTERS = {
    'tokens_choice': TokensChoiceRouter,
    'experts_choice': ExpertsChoiceRouter,
    'soft_moe': SoftMoeRouter,
    'hash': HashRouter,
    'base': BaseLayersRouter,
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


__all__ = ['ROUTERS', 'LinearGate', 'Router', 'get_router_class'] + sorted(
    cls.__name__ for cls in ROUTERS.values())

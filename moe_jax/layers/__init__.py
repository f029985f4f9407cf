"""Flax NNX modules: routers (own their gating params), experts, engines, MoeLayer."""
from moe_jax.layers.engines import ENGINES, get_engine
from moe_jax.layers.call_recorder import recording_moe_calls
from moe_jax.layers.experts import Experts
from moe_jax.layers.hooks import after_step, score_function_loss
from moe_jax.layers.moe_config import LayerContext, MoeConfig
from moe_jax.layers.moe_layer import MoeLayer
from moe_jax.layers.registry import ROUTERS, get_router_class
from moe_jax.layers.routers import (ExpertsChoiceRouter, LinearGate, Router, SoftMoeRouter,
                                    TokensChoiceRouter)

__all__ = ['ENGINES', 'ROUTERS', 'Experts', 'ExpertsChoiceRouter', 'LayerContext', 'LinearGate',
           'MoeConfig', 'MoeLayer', 'after_step', 'recording_moe_calls', 'score_function_loss',
           'Router', 'SoftMoeRouter', 'TokensChoiceRouter', 'get_engine', 'get_router_class']

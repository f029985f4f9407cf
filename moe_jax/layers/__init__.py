"""Flax NNX modules: routers (own their gating params), experts, engines, MoeLayer; and the
hooks a trainer calls for the routers (`score_function_loss`, `after_step`)."""
from moe_jax.layers.engines import ENGINES, get_engine
from moe_jax.layers.experts import Experts
from moe_jax.layers.moe_config import LayerContext, MoeConfig
from moe_jax.layers.moe_layer import (MoeCall, MoeLayer, RoutingRecord, recording_moe_calls,
                                      recording_routings)
from moe_jax.layers.routers import (ROUTERS, ExpertsChoiceRouter, LinearGate, Router,
                                    SoftMoeRouter, TokensChoiceRouter, get_router_class)
from moe_jax.layers.training_hooks import after_step, score_function_loss

__all__ = ['ENGINES', 'ROUTERS', 'Experts', 'ExpertsChoiceRouter', 'LayerContext', 'LinearGate',
           'MoeCall', 'MoeConfig', 'MoeLayer', 'Router', 'RoutingRecord', 'SoftMoeRouter',
           'TokensChoiceRouter', 'after_step', 'get_engine', 'get_router_class',
           'recording_moe_calls', 'recording_routings', 'score_function_loss']

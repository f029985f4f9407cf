"""DeepSeek-V3 router (arXiv 2412.19437), registry name 'deepseek'.

Shared experts are not routed, so they live in `MoeLayer(num_shared_experts=...,
shared_expert_hidden=...)`: h_t = u_t + Σ_shared FFN_s(u_t) + Σ_routed g_i FFN_i(u_t).

Fine-grained experts (DeepSeekMoE, Dai et al. 2024): split each of E experts of width h
into m experts of width h/m and route to m·k of them; same parameters and FLOPs per
token, more combinations. `fine_grained(E, h, k, m)` gives the MoeLayer arguments:

    layer = MoeLayer(d, **fine_grained(8, 512, 2, m=4), router='deepseek', ...)
    # -> num_experts=32, expert_hidden=128, router_kwargs=dict(k=8)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.moe_config import LayerContext
from moe_jax.layers.routers.base import Router, check_k
from moe_jax.parallel.collectives import global_sum
from moe_jax.routing import CapacitySpec, Routing
from moe_jax.routing.deepseek import (BALANCE_COUNTS, SCORE_FUNCS, deepseek_routing,
                                     group_limited_top_k, update_expert_bias)


class ExpertBias(nnx.Variable):
  """Per-expert selection bias b [E], float32: state, not a parameter. The optimizer
  (`nnx.Optimizer(..., wrt=nnx.Param)`) never touches it; `after_step` updates it."""


class ExpertCounts(nnx.Variable):
  """Tokens routed to each expert [E] (float32, summed over the whole batch) by the
  training forward passes since the last `after_step`, which consumes them."""


def fine_grained(num_experts: int, expert_hidden: int, k: int, m: int) -> dict:
  """DeepSeekMoE fine-grained segmentation: (E, h, k) -> (m·E, h/m, m·k).

  Returns `dict(num_experts=..., expert_hidden=..., router_kwargs=dict(k=...))` for
  `MoeLayer(d_model, **fine_grained(...), router='deepseek')` (merge other router_kwargs
  into the returned dict).
  """
  if m < 1 or expert_hidden % m:
    raise ValueError(f'fine_grained: m={m} must be >= 1 and divide expert_hidden={expert_hidden}.')
  return dict(num_experts=m * num_experts, expert_hidden=expert_hidden // m,
              router_kwargs=dict(k=m * k))


class DeepSeekRouter(Router):
  """Sigmoid affinities; top-k of s + b selects; gates from the unbiased s renormalised
  over the selected experts, times route_scale. Causal.

  Aux-loss-free balancing: every training-mode call adds this batch's expert counts c
  (all groups of the call, summed over the whole batch) to the `expert_counts` state;
  `after_step` (the trainer calls it once per step, after the optimizer update, through
  `layers.after_step`) applies b += γ·sign(mean(c) − c) and clears the counts. So the
  bias moves once per step from all of the step's tokens, as in the paper, also with
  gradient accumulation, and the bias used to select within a step is the one from
  before that step's update. Evaluation (`module.eval()`) counts nothing. The counts
  are global under `jax.jit` with a data-sharded batch and inside the expert-parallel
  `shard_map` (`parallel.global_sum`), so every device applies the same update.

  router_kwargs:
    k: routed experts per token (V3: 8; must be <= num_experts).
    bias_update_rate: γ (1e-3, V3 and Megatron; 0 freezes b, as V3's last 500B tokens).
    score_func: 'sigmoid' (V3) or 'softmax' (DeepSeekMoE / V2).
    route_scale: gate multiplier (V3: 2.5).
    n_groups, topk_groups: group-limited routing (V3: 8 and 4; default 1, 1 = off).
    seq_balance_weight: α of the sequence-wise balance loss (V3: 1e-4, default on).
    capacity keywords: none by default = C = S, no token dropped (DeepSeek-V3 drops
      none); capacity_factor gives C = ceil(k·S·cf/E) (V2 used cf 1.0 at device level).
    init_scale: router init (Switch truncated normal; V3 uses std 0.006, not verified).
    and renormalize, group_score, balance_count of `routing.deepseek.deepseek_routing`.
  """
  routing_fn = staticmethod(deepseek_routing)
  default_capacity = CapacitySpec()

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs,
               context: LayerContext | None = None, k: int = 8,
               bias_update_rate: float = 1e-3, init_scale: float = 0.1, **kwargs):
    self.k = check_k(k, num_experts, ' (V3 routes 8 of 256; pass router_kwargs=dict(k=...))')
    super().__init__(d_model, num_experts, rngs=rngs, context=context, kwargs=kwargs,
                     gate_init_scale=init_scale)
    self.bias_update_rate = bias_update_rate
    self.expert_bias = ExpertBias(jnp.zeros((num_experts,), jnp.float32))
    self.expert_counts = ExpertCounts(jnp.zeros((num_experts,), jnp.float32))
    # Fail on bad group options at construction rather than at the first call.
    group_options = {n: v for n, v in kwargs.items()
                     if n in ('n_groups', 'topk_groups', 'group_score')}
    jax.eval_shape(lambda s: group_limited_top_k(s, k, **group_options),
                   jax.ShapeDtypeStruct((num_experts,), jnp.float32))
    for name, choices in (('score_func', SCORE_FUNCS), ('balance_count', BALANCE_COUNTS)):
      if name in kwargs and kwargs[name] not in choices:
        raise ValueError(f'deepseek: {name} must be one of {choices}, got {kwargs[name]!r}.')

  def __call__(self, x: jax.Array, *, token_ids: jax.Array | None = None) -> Routing:
    """x: [G, S, d] -> Routing; in training also counts the tokens per expert."""
    r = deepseek_routing(self.gate(x), self.expert_bias[...], k=self.k,
                         capacity=self.slots(x.shape[1], self.k), **self.routing_kwargs)
    if not self.deterministic and self.bias_update_rate:
      # Global counts, so every device of an expert-parallel layer applies the same update.
      counts = global_sum(jnp.sum(jax.nn.one_hot(r.token_expert, self.num_experts,
                                                 dtype=jnp.float32), axis=(0, 1, 2)))
      self.expert_counts[...] = self.expert_counts[...] + counts
    return r

  def after_step(self, rewards=None, *, mask=None) -> None:
    """b += γ·sign(mean(c) − c) from the counts of the step's training calls; clears c."""
    if self.bias_update_rate:
      self.expert_bias[...] = update_expert_bias(self.expert_bias[...], self.expert_counts[...],
                                                 self.bias_update_rate)
      self.expert_counts[...] = jnp.zeros_like(self.expert_counts[...])

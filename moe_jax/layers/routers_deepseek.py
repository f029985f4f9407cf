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

from moe_jax.layers.router_kwargs import check_routing_kwargs
from moe_jax.layers.routers import LinearGate, Router
from moe_jax.parallel.collectives import global_sum
from moe_jax.routing import Routing
from moe_jax.routing.deepseek import (BALANCE_COUNTS, SCORE_FUNCS, deepseek_routing,
                                     group_limited_top_k, update_expert_bias)


class ExpertBias(nnx.Variable):
  """Per-expert selection bias b [E], float32: state, not a parameter. The optimizer
  (`nnx.Optimizer(..., wrt=nnx.Param)`) never touches it; the router updates it in its
  training-mode forward pass, like BatchNorm statistics."""


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

  Aux-loss-free balancing: in training mode, every call updates the `expert_bias`
  state with b += γ·sign(mean(c) − c) from this batch's expert counts c (all groups of
  the call). The trainer calls the model once per step, so the update is applied once
  per step, as in the paper; with gradient accumulation over n micro-batches it is
  applied n times (divide `bias_update_rate` by n), and the bias used to select within a
  step is the one from before that step's update. Evaluation (`module.eval()`) never
  updates. Under `jax.jit` with a data-sharded batch the counts are global (the sum runs
  over the whole batch); inside a hand-written `shard_map` they would be per shard.

  router_kwargs:
    k: routed experts per token (V3: 8; must be <= num_experts).
    bias_update_rate: γ (1e-3, V3 and Megatron; 0 freezes b, as V3's last 500B tokens).
    score_func: 'sigmoid' (V3) or 'softmax' (DeepSeekMoE / V2).
    route_scale: gate multiplier (V3: 2.5).
    n_groups, topk_groups: group-limited routing (V3: 8 and 4; default 1, 1 = off).
    seq_balance_weight: α of the sequence-wise balance loss (V3: 1e-4, default on).
    capacity_factor: None (default): C = S, no token dropped (DeepSeek-V3 drops none);
      a number gives C = ceil(k·S·cf/E) (V2 used cf 1.0 at device level in training).
    eval_capacity_factor: default same as training.
    init_scale: router init (Switch truncated normal; V3 uses std 0.006, not verified).
    and renormalize, group_score, balance_count, capacity, capacity_include_k,
    capacity_rounding, capacity_multiple_of, min_capacity of
    `routing.deepseek.deepseek_routing`.
  """
  routing_fn = staticmethod(deepseek_routing)

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs, k: int = 8,
               bias_update_rate: float = 1e-3, capacity_factor: float | None = None,
               eval_capacity_factor: float | None = None, init_scale: float = 0.1,
               **routing_kwargs):
    if not 1 <= k <= num_experts:
      raise ValueError(f'deepseek: k={k} must be between 1 and num_experts={num_experts} '
                       '(V3 routes 8 of 256; pass router_kwargs=dict(k=...)).')
    self.gate = LinearGate(d_model, num_experts, init_scale=init_scale, rngs=rngs)
    self.expert_bias = ExpertBias(jnp.zeros((num_experts,), jnp.float32))
    self.k, self.num_experts, self.bias_update_rate = k, num_experts, bias_update_rate
    self.capacity_factor = capacity_factor
    self.eval_capacity_factor = (capacity_factor if eval_capacity_factor is None
                                 else eval_capacity_factor)
    self.routing_kwargs = check_routing_kwargs(
        deepseek_routing, routing_kwargs, 'deepseek', reserved=('k', 'capacity_factor'))
    # Fail on bad group options at construction rather than at the first call.
    group_options = {n: v for n, v in routing_kwargs.items()
                     if n in ('n_groups', 'topk_groups', 'group_score')}
    jax.eval_shape(lambda s: group_limited_top_k(s, k, **group_options),
                   jax.ShapeDtypeStruct((num_experts,), jnp.float32))
    for name, choices in (('score_func', SCORE_FUNCS), ('balance_count', BALANCE_COUNTS)):
      if name in routing_kwargs and routing_kwargs[name] not in choices:
        raise ValueError(f'deepseek: {name} must be one of {choices}, '
                         f'got {routing_kwargs[name]!r}.')
    self.deterministic = False

  def __call__(self, x: jax.Array, *, token_ids: jax.Array | None = None) -> Routing:
    """x: [G, S, d] -> Routing; in training also updates `expert_bias`."""
    bias = self.expert_bias[...]
    cf = self.eval_capacity_factor if self.deterministic else self.capacity_factor
    r = deepseek_routing(self.gate(x), bias, k=self.k, capacity_factor=cf, **self.routing_kwargs)
    if not self.deterministic and self.bias_update_rate:
      # Global counts, so every device of an expert-parallel layer applies the same update.
      counts = global_sum(jnp.sum(jax.nn.one_hot(r.token_expert, self.num_experts,
                                                 dtype=jnp.float32), axis=(0, 1, 2)))
      self.expert_bias[...] = update_expert_bias(bias, counts, self.bias_update_rate)
    return r

"""DeepSeek-V3 routing (DeepSeek-AI 2024, arXiv 2412.19437, §2.1.2; official inference code).

    s = sigmoid(logits)                        affinities, float32
    selection: top-k of s + b                  b: per-expert bias, used ONLY to select
    gate: g_i = s_i / Σ_{j selected} s_j · route_scale   (unbiased s; route_scale 2.5 in V3)

Group-limited ("node-limited") routing: the E experts form `n_groups` equal groups; a
group's score is the sum of its top-2 biased scores; only the best `topk_groups` groups
stay eligible, then top-k over their experts (V3: 8 groups, 4 kept, k = 8 of 256).

Aux-loss-free balancing (Wang et al. 2024, arXiv 2408.15664; V3 §2.1.2): after each step
b_i <- b_i + γ · sign(mean_j c_j − c_i), c_i the tokens routed to expert i in the batch,
γ = 1e-3 (`update_expert_bias`; no gradient, the router module owns b).

Complementary sequence-wise balance loss (V3 eqs. 17-20), T = tokens of one sequence:
    f_i = E / (k · T) · Σ_t 1[i ∈ TopK_t]      (= 1 for every i at perfect balance)
    s'_{i,t} = s_{i,t} / Σ_j s_{j,t},   P_i = (1/T) Σ_t s'_{i,t}
    L_bal = α · Σ_i f_i · P_i,   α = 1e-4 in V3 (on by default, as in the paper)
computed per routing group (one sequence per group in `MoeLayer`'s default grouping)
and averaged over groups. The paper writes TopK over the unbiased s (`balance_count=
'unbiased'`, default); Megatron counts the experts actually selected (with bias and
group limit, `balance_count='selected'`).

DeepSeek drops no token in training or inference: the default capacity is C = S
(`CapacitySpec.slots` without a factor). Causal: selection and gates depend on the token and on b, which
only changes between steps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import losses as losses_lib
from moe_jax.routing.capacity import CapacitySpec
from moe_jax.routing.tokens_choice import finish_token_routing
from moe_jax.routing.types import Routing

Array = jax.Array

SCORE_FUNCS = ('sigmoid', 'softmax')
GROUP_SCORES = ('top2_sum', 'max')
BALANCE_COUNTS = ('unbiased', 'selected')


def group_limited_top_k(scores: Array, k: int, *, n_groups: int = 1, topk_groups: int = 1,
                        group_score: str = 'top2_sum') -> Array:
  """Indices of the top-k scores among the experts of the best `topk_groups` groups.

  Args:
    scores: [..., E] selection scores (V3: s + b).
    k: experts per token.
    n_groups: groups of E / n_groups consecutive experts (1: no group limit).
    topk_groups: groups kept per token.
    group_score: 'top2_sum' (V3 with bias: sum of the group's two best scores; the best
      one for groups of one expert) or 'max' (V3 code without bias).
  Returns:
    [..., k] int32 expert indices, best first.
  """
  num_experts = scores.shape[-1]
  if n_groups > 1:
    if num_experts % n_groups:
      raise ValueError(f'n_groups={n_groups} must divide the number of experts ({num_experts}).')
    per_group = num_experts // n_groups
    if not 1 <= topk_groups <= n_groups:
      raise ValueError(f'topk_groups={topk_groups} must be in [1, n_groups={n_groups}].')
    if k > topk_groups * per_group:
      raise ValueError(f'k={k} exceeds the {topk_groups * per_group} experts of the '
                       f'{topk_groups} kept groups; raise topk_groups.')
    if group_score not in GROUP_SCORES:
      raise ValueError(f'group_score must be one of {GROUP_SCORES}, got {group_score!r}.')
    grouped = scores.reshape(*scores.shape[:-1], n_groups, per_group)
    if group_score == 'max':
      gscore = jnp.max(grouped, axis=-1)
    else:
      gscore = jnp.sum(jax.lax.top_k(grouped, min(2, per_group))[0], axis=-1)
    _, keep = jax.lax.top_k(gscore, topk_groups)
    kept = jnp.sum(jax.nn.one_hot(keep, n_groups, dtype=jnp.int32), axis=-2) > 0  # [..., n_groups]
    scores = jnp.where(kept[..., None], grouped, -jnp.inf).reshape(scores.shape)
  return jax.lax.top_k(scores, k)[1].astype(jnp.int32)


def sequence_balance_loss(scores: Array, expert_index: Array) -> Array:
  """Σ_i f_i · P_i per group, averaged over groups (V3 eqs. 17-20, without α).

  Args:
    scores: [G, S, E] affinities s (normalised here over all E experts: s').
    expert_index: [G, S, K] the top-K set of each token (counts carry no gradient).
  """
  num_experts = scores.shape[-1]
  _, t, k = expert_index.shape
  counts = jnp.sum(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32), axis=(1, 2))
  f = jax.lax.stop_gradient(counts * num_experts / (k * t))                 # [G, E]
  p = jnp.mean(scores / jnp.sum(scores, axis=-1, keepdims=True), axis=1)    # [G, E]
  return jnp.mean(jnp.sum(f * p, axis=-1))


def update_expert_bias(bias: Array, counts: Array, rate: float = 1e-3) -> Array:
  """b + γ · sign(mean(c) − c): overloaded experts go down, underloaded go up.

  Args:
    bias: [E] float32.
    counts: [E] tokens routed to each expert in the step's batch.
    rate: γ (1e-3 in V3 for most of training, then 0).
  """
  counts = counts.astype(jnp.float32)
  return bias + rate * jnp.sign(jnp.mean(counts) - counts)


def deepseek_routing(logits: Array, bias: Array | None = None, *, k: int = 8,
                     score_func: str = 'sigmoid', renormalize: bool | None = None,
                     route_scale: float = 2.5, n_groups: int = 1, topk_groups: int = 1,
                     group_score: str = 'top2_sum', seq_balance_weight: float = 1e-4,
                     balance_count: str = 'unbiased', capacity_factor: float | None = None,
                     capacity: int | None = None, capacity_include_k: bool = True,
                     capacity_rounding: str = 'ceil', capacity_multiple_of: int = 1,
                     min_capacity: int = 1,
                     slot_order: str = 'choice') -> Routing:
  """DeepSeek-V3 routing of the routed experts (shared experts live in `MoeLayer`).

  Args:
    logits: [G, S, E] u_t · e_i.
    bias: [E] selection bias b (None: zeros).
    k: routed experts per token (V3: 8).
    score_func: 'sigmoid' (V3) or 'softmax' (DeepSeekMoE / V2).
    renormalize: divide the selected gates by their sum; None = True for sigmoid and
      False for softmax (V3 inference code).
    route_scale: multiplies the gates (V3: 2.5; V2-Lite: 1.0).
    n_groups, topk_groups, group_score: group-limited routing (see `group_limited_top_k`).
    seq_balance_weight: α of the sequence-wise balance loss (V3: 1e-4; 0 turns it off).
    balance_count: 'unbiased' (paper eq. 18) or 'selected' (Megatron) top-K set for f.
    capacity_factor: None (default) gives C = S, no token dropped (DeepSeek-V3);
      a number gives C = ceil(k · S · capacity_factor / E).
    capacity: explicit C.
    capacity_include_k, capacity_rounding, capacity_multiple_of, min_capacity: see
      `compute_capacity`.
    slot_order: 'choice' (all first choices before any second: the Google codebases)
      or 'token' (token by token; routers use it in a causal context), see `assign_slots`.

  Returns:
    A sparse `Routing`; aux loss 'seq_balance' when α > 0.
  """
  logits = logits.astype(jnp.float32)
  _, s, num_experts = logits.shape
  if not 1 <= k <= num_experts:
    raise ValueError(f'k={k} must be between 1 and the number of routed experts ({num_experts}).')
  if score_func not in SCORE_FUNCS:
    raise ValueError(f'score_func must be one of {SCORE_FUNCS}, got {score_func!r}.')
  if balance_count not in BALANCE_COUNTS:
    raise ValueError(f'balance_count must be one of {BALANCE_COUNTS}, got {balance_count!r}.')
  if renormalize is None:
    renormalize = score_func == 'sigmoid'
  scores = jax.nn.sigmoid(logits) if score_func == 'sigmoid' else jax.nn.softmax(logits, axis=-1)
  biased = scores if bias is None else scores + jax.lax.stop_gradient(bias.astype(jnp.float32))
  expert_index = group_limited_top_k(jax.lax.stop_gradient(biased), k, n_groups=n_groups,
                                     topk_groups=topk_groups, group_score=group_score)
  weight = jnp.take_along_axis(scores, expert_index, axis=-1)                # unbiased s
  if renormalize:
    weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
  weight = weight * route_scale
  if balance_count == 'unbiased':
    balance_index = jax.lax.top_k(jax.lax.stop_gradient(scores), k)[1]
  else:
    balance_index = expert_index
  raw = dict(seq_balance=sequence_balance_loss(scores, balance_index))
  counts = jnp.sum(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32), axis=(0, 1, 2))
  metrics = dict(seq_balance_loss=raw['seq_balance'],
                 max_violation=jnp.max(counts) / jnp.maximum(jnp.mean(counts), 1e-9) - 1.0)
  c = CapacitySpec(capacity_factor, capacity=capacity, capacity_include_k=capacity_include_k,
                   capacity_rounding=capacity_rounding, capacity_multiple_of=capacity_multiple_of,
                   min_capacity=min_capacity).slots(s, num_experts, k=k)
  probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  aux = losses_lib.weighted(raw, dict(seq_balance=seq_balance_weight))
  return finish_token_routing(probs, expert_index, weight, capacity=c, aux_losses=aux,
                              metrics=metrics, slot_order=slot_order)

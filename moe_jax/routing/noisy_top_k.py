"""Noisy top-k gating (Shazeer et al. 2017, arXiv 1701.06538, §2.1, §4 and App. A).

    std_i  = softplus((x·W_noise)_i) + noise_epsilon        (t2t adds 1e-2)
    H(x)_i = (x·W_g)_i + ε_i · std_i,   ε ~ N(0, 1)          training only
    G(x)   = softmax(KeepTopK(H(x), k))   the softmax runs over the k kept logits only,
                                          so the gates of a token sum to 1

Auxiliary losses over a routing group X (the paper's batch; we average over groups):

    Importance(X)_i = Σ_x G(x)_i                        L_importance = CV(Importance)²
    P(x, i) = Φ(((x·W_g)_i − kth_excluding(H(x), k, i)) / std_i)
    Load(X)_i = Σ_x P(x, i)                             L_load = CV(Load)²

kth_excluding(v, k, i) is the k-th largest component of v once v_i is removed: the
(k+1)-th largest of v when i is in the top k, the k-th largest otherwise (t2t
`_prob_in_top_k`). CV² = var / mean² with the population variance (t2t `cv_squared`).
Without noise (evaluation, or k = E) the load is the count of tokens per expert,
which carries no gradient (t2t `_gates_to_load`).

The paper has no capacity (its dispatcher is dynamically sized), so the default here
is C = S: an expert can take every token of the group and nothing is ever dropped.
A `capacity_factor` gives a fixed compute budget instead. Causal: a token's experts
depend on that token only, and capacity (if any) is granted in token order.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import losses as losses_lib
from moe_jax.routing.capacity import CapacitySpec
from moe_jax.routing.tokens_choice import finish_token_routing
from moe_jax.routing.types import Routing

Array = jax.Array


def _normal_cdf(z: Array) -> Array:
  """Φ(z) = (1 + erf(z / √2)) / 2, as t2t computes it."""
  return 0.5 * (1.0 + jax.lax.erf(z * 0.7071067811865476))


def noisy_top_k(clean_logits: Array, raw_noise_logits: Array | None = None,
                normal_noise: Array | None = None, *, k: int = 4, noise_epsilon: float = 1e-2,
                capacity_factor: float | None = None, capacity: int | None = None,
                importance_weight: float = 0.1, load_weight: float = 0.1,
                capacity_include_k: bool = True, capacity_rounding: str = 'ceil',
                capacity_multiple_of: int = 1, min_capacity: int = 1,
                slot_order: str = 'choice') -> Routing:
  """Noisy top-k gating with the importance and smooth load losses.

  Args:
    clean_logits: [G, S, E] x·W_g.
    raw_noise_logits: [G, S, E] x·W_noise (pre-softplus), or None for no noise.
    normal_noise: [G, S, E] standard normal draws ε, or None (evaluation: no noise).
      Noise is used only when both are given.
    k: experts per token (the paper's language models use k = 4).
    noise_epsilon: added to the softplus std (t2t `noise_epsilon=1e-2`).
    capacity_factor: None (default) gives C = S, no dropping, as in the paper; a
      number gives C = ceil(k · S · capacity_factor / E) (see `compute_capacity`).
    capacity: explicit C, overrides `capacity_factor`.
    importance_weight, load_weight: w_importance and w_load (paper App. A; 0.1 each).
    capacity_include_k, capacity_rounding, capacity_multiple_of, min_capacity: the
      capacity convention when `capacity_factor` is given.
    slot_order: 'choice' (all first choices before any second: the Google codebases)
      or 'token' (token by token; routers use it in a causal context), see `assign_slots`.

  Returns:
    A sparse `Routing`; aux_losses 'importance' and 'load' (weighted).
  """
  _, s, num_experts = clean_logits.shape
  if not 1 <= k <= num_experts:
    raise ValueError(f'k={k} must be between 1 and the number of experts ({num_experts}).')
  clean = clean_logits.astype(jnp.float32)
  noisy = raw_noise_logits is not None and normal_noise is not None
  if noisy:
    std = jax.nn.softplus(raw_noise_logits.astype(jnp.float32)) + noise_epsilon
    logits = clean + normal_noise.astype(jnp.float32) * std
  else:
    logits = clean
  top_values, top_index = jax.lax.top_k(logits, min(k + 1, num_experts))   # [G, S, k+1]
  gate_k = jax.nn.softmax(top_values[..., :k], axis=-1)                    # [G, S, k]
  expert_index = top_index[..., :k]
  gates = jnp.sum(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)
                  * gate_k[..., None], axis=2)                             # [G, S, E]
  importance = jnp.sum(gates, axis=1)                                      # [G, E]
  if noisy and k < num_experts:
    threshold_if_in = top_values[..., k:k + 1]        # (k+1)-th largest noisy logit
    threshold_if_out = top_values[..., k - 1:k]       # k-th largest noisy logit
    is_in = logits > threshold_if_in
    prob = jnp.where(is_in, _normal_cdf((clean - threshold_if_in) / std),
                     _normal_cdf((clean - threshold_if_out) / std))
    load = jnp.sum(prob, axis=1)
  else:
    load = jnp.sum((gates > 0).astype(jnp.float32), axis=1)
  raw = dict(importance=jnp.mean(losses_lib.cv_squared(importance, axis=-1)),
             load=jnp.mean(losses_lib.cv_squared(load, axis=-1)))
  aux = losses_lib.weighted(raw, dict(importance=importance_weight, load=load_weight))
  c = CapacitySpec(capacity_factor, capacity=capacity, capacity_include_k=capacity_include_k,
                   capacity_rounding=capacity_rounding, capacity_multiple_of=capacity_multiple_of,
                   min_capacity=min_capacity).slots(s, num_experts, k=k)
  return finish_token_routing(jax.nn.softmax(clean, axis=-1), expert_index, gate_k, capacity=c,
                              aux_losses=aux, metrics={f'{n}_loss': v for n, v in raw.items()},
                              slot_order=slot_order)

"""Auxiliary router losses, unweighted, each averaged over routing groups.

All take float32 router quantities per group and return a scalar. Coefficients are
applied by the routing functions (`aux_losses` holds weighted values).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def load_balancing_loss(probs: Array, expert_index: Array, *, count: str = 'top1') -> Array:
  """Switch / GShard load-balancing loss  E · Σ_e f_e · P_e  (mean over groups).

  Fedus et al. 2021 eq. (4)-(6); GShard Algorithm 1 with the E² "const coefficient"
  that mesh-tf, lingvo, flaxformer and vmoe use (mean_e(f·P)·E² = E·Σ f·P).

  Args:
    probs: [G, S, E] router probabilities (softmax over experts).
    expert_index: [G, S, K] experts chosen per token *before* capacity. Only used as
      counts, so no gradient flows through f.
    count: 'top1' uses only the first choice for f (Switch, GShard, mesh-tf, lingvo);
      'topk' counts every choice divided by K, so the uniform value stays 1
      (Megatron). flaxformer's union-of-top-k (uniform value k) is 'topk' times K.

  Returns:
    Scalar; equals 1 at perfectly uniform routing and E when every token goes to one
    expert with probability 1.
  """
  num_experts = probs.shape[-1]
  # XLA:CPU (jaxlib 0.10) rewrites top_k into a full sort over E when the top_k indices
  # are sliced (below) and its values are differentiated: 2.6 s instead of 40 ms at
  # E=256, 8192 tokens. The barrier keeps the slice from reaching the top_k.
  expert_index = jax.lax.optimization_barrier(expert_index)
  if count == 'top1':
    chosen = expert_index[..., :1]
  elif count == 'topk':
    chosen = expert_index
  else:
    raise ValueError(f"count must be 'top1' or 'topk', got {count!r}")
  onehot = jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32)   # [G, S, K', E]
  f = jax.lax.stop_gradient(jnp.mean(jnp.sum(onehot, axis=2), axis=1) / chosen.shape[-1])
  p = jnp.mean(probs, axis=1)                                         # [G, E]
  return jnp.mean(num_experts * jnp.sum(f * p, axis=-1))


def router_z_loss(logits: Array) -> Array:
  """ST-MoE router z-loss  (1/B) Σ_tokens (log Σ_e exp(h_e))²  (Zoph et al. 2022, eq. 5).

  Args:
    logits: [G, S, E] (or [..., E]) pre-softmax router logits, float32.
  """
  z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(z ** 2)


def cv_squared(values: Array, axis: int = -1, eps: float = 1e-10) -> Array:
  """Squared coefficient of variation var/mean² with the population variance (t2t)."""
  mean = jnp.mean(values, axis=axis)
  var = jnp.var(values, axis=axis)
  return var / (mean ** 2 + eps)


def importance_loss(gates: Array) -> Array:
  """Importance loss  CV(Σ_tokens gates)²  (Shazeer et al. 2017 eq. 6; V-MoE A.2).

  Args:
    gates: [G, S, E] per-token expert weights (softmax probabilities or gates).
  """
  importance = jnp.sum(gates.astype(jnp.float32), axis=1)   # [G, E]
  return jnp.mean(cv_squared(importance, axis=-1))


def weighted(raw: dict[str, Array], weights: dict[str, float]) -> dict[str, Array]:
  """Keeps the losses whose weight is non-zero, multiplied by it."""
  return {name: weights[name] * value for name, value in raw.items() if weights.get(name, 0.0)}

"""Routing metrics shared by every router. Logged, never differentiated.

Every routing reports:
  * `dropped_fraction`: fraction of requested (token, expert) assignments that did not
    get a slot (token choice: over capacity; expert choice and Soft MoE: 0 by
    definition, nobody asked);
  * `unrouted_fraction`: fraction of tokens processed by no expert at all (their MoE
    output is zero and only the residual carries them);
  * `expert_load`: [E], share of all processed (token, slot) weight mass per expert,
    sums to 1; uniform is 1/E;
  * `router_entropy`: mean over tokens of the entropy of the router distribution, nats.

Token choice, Switch and expert choice also report `router_logit_max`, the largest
|logit| of the call, beside `router_z_loss`, the mean squared logsumexp of the logits:
the logit magnitudes that the ST-MoE router z-loss keeps small.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def entropy(probs: Array, axis=-1) -> Array:
  """Mean entropy (nats) of distributions along `axis`."""
  p = probs.astype(jnp.float32)
  return jnp.mean(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis))


def router_logit_max(logits: Array) -> Array:
  """max |logit| over every token and expert of the call (a scalar, no gradient)."""
  return jax.lax.stop_gradient(jnp.max(jnp.abs(logits.astype(jnp.float32))))


def sparse_metrics(slot_token: Array, num_tokens: int, router_probs: Array,
                   num_requested: Array | int | None = None) -> dict[str, Array]:
  """Metrics of a slot-table routing.

  Args:
    slot_token: [G, E, C] int32 source token per slot, `num_tokens` when empty.
    num_tokens: S.
    router_probs: [G, S, E] the router's distribution over experts (for the entropy).
    num_requested: total (token, expert) assignments asked for across all groups,
      before capacity; None means every filled slot was requested (nothing dropped).
  """
  g, e, _ = slot_token.shape
  filled = slot_token < num_tokens                                   # [G, E, C]
  num_filled = jnp.sum(filled)
  load = jnp.sum(filled, axis=(0, 2)).astype(jnp.float32)
  # Tokens that received at least one slot.
  hits = jnp.zeros((g, num_tokens + 1), jnp.int32)
  hits = hits.at[jnp.arange(g)[:, None], slot_token.reshape(g, -1)].add(1)[:, :num_tokens]
  unrouted = jnp.mean((hits == 0).astype(jnp.float32))
  if num_requested is None:
    dropped = jnp.zeros((), jnp.float32)
  else:
    dropped = 1.0 - num_filled.astype(jnp.float32) / jnp.maximum(num_requested, 1)
  return dict(dropped_fraction=dropped, unrouted_fraction=unrouted,
              expert_load=load / jnp.maximum(jnp.sum(load), 1.0),
              router_entropy=entropy(router_probs))


def dense_metrics(dispatch: Array, router_probs: Array,
                  router_logits: Array | None = None) -> dict[str, Array]:
  """Metrics of a dense (Soft MoE style) routing: nothing dropped, nothing unrouted.

  Args:
    dispatch: [G, S, E, C] dispatch weights.
    router_probs: [G, S, E'] a distribution per token for the entropy (Soft MoE: the
      combine weights over all E·P slots).
    router_logits: [G, S, E'] optional logits with `router_probs = softmax(logits)`: the
      entropy is then `logsumexp(l) - Σ p·l`, with one log per token instead of one per
      probability.
  """
  g, s, e, c = dispatch.shape
  # Reduced on a [G·S, E·C] view: XLA:CPU reduces arrays with a trailing axis of size
  # C = 1 (Soft MoE, 1 slot per expert) several times slower.
  mass = jnp.sum(dispatch.reshape(g * s, e * c).astype(jnp.float32), axis=0)
  mass = jnp.sum(mass.reshape(e, c), axis=-1)                        # [E]
  zero = jnp.zeros((), jnp.float32)
  if router_logits is None:
    ent = entropy(router_probs)
  else:
    logits = router_logits.astype(jnp.float32)
    probs = router_probs.astype(jnp.float32)
    ent = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.sum(probs * logits, axis=-1))
  return dict(dropped_fraction=zero, unrouted_fraction=zero,
              expert_load=mass / jnp.maximum(jnp.sum(mass), 1e-9), router_entropy=ent)

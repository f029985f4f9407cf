"""From per-token expert choices to a capacity-limited slot table.

Shared by every router in which tokens pick experts (token choice, Switch, GShard,
hash, BASE, DeepSeek...). Priority follows the Google implementations (mesh-tf,
lingvo, flaxformer, vmoe): **all first choices take slots before any second choice**;
within one choice rank, tokens go in group order, or in batch-prioritised order
(highest top-1 gate first, Riquelme et al. 2021 §3.1) when a priority is given.

That order reads the future: token t's second choice can lose its slot to the first
choice of a later token. In a decoder (`slot_order='token'`, which routers use when their
`LayerContext` is causal) every choice of token t goes before any choice of token t + 1,
so whether a choice is dropped depends on earlier tokens only.

Positions come from one sort of the K·S assignments by (expert, priority) rather
than from a cumsum over a one-hot [K·S, E] tensor, so memory stays O(K·S).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


SLOT_ORDERS = ('choice', 'token')


def _assign_group(expert_index: Array, weight: Array, mask: Array, priority: Array | None,
                  num_experts: int, capacity: int, slot_order: str = 'choice'):
  """One group. expert_index, weight, mask: [S, K]; priority: [S] or None."""
  num_tokens, k = expert_index.shape
  n = num_tokens * k
  # k-major flattening: entry i = r * S + s is token s's r-th choice.
  e_flat = jnp.where(mask, expert_index, num_experts).T.reshape(n).astype(jnp.int32)
  tok_flat = jnp.tile(jnp.arange(num_tokens, dtype=jnp.int32), k)
  w_flat = weight.T.reshape(n)
  if priority is None:
    rank = jnp.arange(num_tokens, dtype=jnp.int32)
  else:
    # rank[s]: position of token s when sorted by descending priority (stable).
    order = jnp.argsort(-priority, stable=True)
    rank = jnp.zeros(num_tokens, jnp.int32).at[order].set(jnp.arange(num_tokens, dtype=jnp.int32))
  choice = jnp.repeat(jnp.arange(k, dtype=jnp.int32), num_tokens)      # r of entry r * S + s
  token_rank = jnp.tile(rank, k)
  if slot_order == 'choice':
    prio_flat = choice * num_tokens + token_rank
  else:
    prio_flat = token_rank * k + choice
  entry = jnp.arange(n, dtype=jnp.int32)
  sorted_e, _, sorted_entry = jax.lax.sort((e_flat, prio_flat, entry), num_keys=2)
  counts = jnp.zeros(num_experts + 1, jnp.int32).at[e_flat].add(1)
  starts = jnp.cumsum(counts) - counts
  pos = jnp.zeros(n, jnp.int32).at[sorted_entry].set(entry - starts[sorted_e])
  kept = (pos < capacity) & (e_flat < num_experts)
  sentinel = num_experts * capacity
  flat_slot = jnp.where(kept, e_flat * capacity + pos, sentinel)
  slot_token = jnp.full(sentinel, num_tokens, jnp.int32).at[flat_slot].set(tok_flat, mode='drop')
  slot_weight = jnp.zeros(sentinel, w_flat.dtype).at[flat_slot].set(w_flat, mode='drop')
  token_slot = flat_slot.reshape(k, num_tokens).T
  return (slot_token.reshape(num_experts, capacity), slot_weight.reshape(num_experts, capacity),
          token_slot)


def assign_slots(expert_index: Array, weight: Array, num_experts: int, capacity: int, *,
                 mask: Array | None = None, priority: Array | None = None,
                 slot_order: str = 'choice'):
  """Places each (token, choice) into its expert's buffer, dropping overflow.

  Args:
    expert_index: [G, S, K] int, expert of each token's k-th choice.
    weight: [G, S, K] float, combine weight of each choice (differentiable).
    num_experts: E.
    capacity: C, slots per expert per group.
    mask: [G, S, K] bool, choices to place (False: not requested, takes no slot).
    priority: [G, S] float, batch-prioritised routing score (higher goes first);
      None keeps token order.
    slot_order: 'choice' (all first choices before any second one; the Google
      implementations) or 'token' (token by token: causal).

  Returns:
    slot_token [G, E, C] int32 (S for empty), slot_weight [G, E, C],
    token_slot [G, S, K] int32 (flat e * C + c, or E * C when dropped).
  """
  if slot_order not in SLOT_ORDERS:
    raise ValueError(f'slot_order must be one of {SLOT_ORDERS}, got {slot_order!r}.')
  if mask is None:
    mask = jnp.ones(expert_index.shape, bool)
  fn = lambda e, w, m, p: _assign_group(e, w, m, p, num_experts, capacity, slot_order)
  if priority is None:
    return jax.vmap(lambda e, w, m: fn(e, w, m, None))(expert_index, weight, mask)
  return jax.vmap(fn)(expert_index, weight, mask, priority)

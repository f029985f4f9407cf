"""Causal Soft MoE for decoders (our design; the Soft MoE paper leaves decoders to future work).

Soft MoE (Puigcerver et al. 2023) mixes every token of a sequence into every slot, so
token t's output depends on later tokens. Here every slot is tied to a position:

  * Slot instances. Position t opens `r = slots_per_position` new slots. Instance
    j = t·r + i (i < r) belongs to expert n = j mod E and is that expert's instance
    c = j div E; it uses the slot parameters φ[n, c mod P] (P = parameter slots per
    expert, as in Soft MoE). So C = ceil(S·r / E) instances per expert, and instance
    (n, c) sits at position pos(n, c) = (c·E + n) div r.
  * Dispatch. Instance (n, c) mixes tokens m <= pos(n, c) only, with a causally masked
    softmax over m of logits[m, n, c mod P].
  * Combine. Token t mixes the outputs of the instances with pos <= t only (their
    inputs are all <= t), with a softmax over those instances of logits[t, n, c mod P].

Hence y_t depends on x_1..x_t only (exactly: masked weights are exact zeros), and every
token has at least the r instances opened at position 0. Cycling experts along time
(expert n's instances sit at positions ≡ n mod E when r = 1) spreads every expert's
slots evenly over the whole sequence instead of a block of positions; the paper warns
that tying slots to token indices could bias which positions each expert is trained on.

Cost per group, with r = 1, against Soft MoE with E·P slots:
  * expert evaluations: r·S (Soft MoE: E·P; equal at the paper's setting E·P ≈ S);
  * dispatch/combine tensors [S, E, C]: r·S² entries (Soft MoE: S·E·P);
  * incremental decoding: r expert evaluations per new token plus a combine over the
    r·t cached slot outputs (Soft MoE would redo every slot at every step).
Differences from the paper: slots see prefixes of different lengths (early slots mix
few tokens), a slot's parameters are shared by all instances of (n, p), and the number
of slot instances grows with the sequence instead of being fixed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing.metrics import dense_metrics
from moe_jax.routing.types import Routing

Array = jax.Array
_MASKED = -1e30


def causal_slot_layout(num_tokens: int, num_experts: int, slots_per_position: int = 1):
  """Where each slot instance sits.

  Returns:
    pos [E, C] int32 position of instance (n, c); valid [E, C] bool (the last
    instances of some experts are padding when S·r is not a multiple of E); and C.
  """
  if slots_per_position < 1:
    raise ValueError(f'slots_per_position must be >= 1, got {slots_per_position}.')
  total = num_tokens * slots_per_position
  capacity = -(-total // num_experts)
  j = (jnp.arange(capacity, dtype=jnp.int32)[None, :] * num_experts
       + jnp.arange(num_experts, dtype=jnp.int32)[:, None])              # [E, C]
  return j // slots_per_position, j < total, capacity


def _masked_softmax(x: Array, mask: Array, axis) -> Array:
  probs = jax.nn.softmax(jnp.where(mask, x, _MASKED), axis=axis)
  return jnp.where(mask, probs, 0.0)


def soft_moe_causal(logits: Array, *, slots_per_position: int = 1) -> Routing:
  """Causal Soft MoE dispatch and combine weights.

  Args:
    logits: [G, S, E, P] token-slot logits (as for `soft_moe`).
    slots_per_position: r, slot instances opened per position (cost ∝ r).

  Returns:
    A dense `Routing` with C = ceil(S·r / E): dispatch and combine [G, S, E, C].
  """
  logits = logits.astype(jnp.float32)
  g, s, e, p = logits.shape
  pos, valid, capacity = causal_slot_layout(s, e, slots_per_position)
  param = jnp.arange(capacity, dtype=jnp.int32) % p
  slot_logits = jnp.take(logits, param, axis=3)                          # [G, S, E, C]
  token = jnp.arange(s, dtype=jnp.int32)[:, None, None]
  dispatch_mask = valid & (token <= pos)                                 # [S, E, C]
  combine_mask = valid & (pos <= token)
  dispatch = _masked_softmax(slot_logits, dispatch_mask, axis=1)
  combine = _masked_softmax(slot_logits.reshape(g, s, e * capacity),
                            combine_mask.reshape(s, e * capacity), axis=-1)
  metrics = dense_metrics(dispatch, combine)
  metrics['slots_per_token'] = jnp.asarray(jnp.sum(valid) / s, jnp.float32)
  return Routing(num_tokens=s, dispatch_weights=dispatch,
                 combine_weights=combine.reshape(g, s, e, capacity), metrics=metrics)

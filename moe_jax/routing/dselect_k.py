"""DSelect-k gating (Hazimeh et al. 2021, arXiv 2106.03760; official Keras code
google-research/dselect_k_moe).

Each of k "single-expert selectors" picks one expert through a smoothed binary code:

    S(t) = 0 for t <= -γ/2,  1 for t >= γ/2,  -2t³/γ³ + 3t/(2γ) + 1/2 otherwise
    r(z)_e = Π_{j=1..m} [ S(z_j) if bit_j(e) = 1 else 1 - S(z_j) ],   m = ceil(log2 E)
                                                         (bits MSB first, like np.binary_repr)
    q = Σ_{i=1..k} softmax(w)_i · r(z^(i))                            expert weights [E]

S is C¹ with zero gradient outside (-γ/2, γ/2), so a selector "locks" on one expert once
its z leave that band; q then has at most k non-zeros. Until then every expert may carry
weight, so training evaluates every expert (the paper and code are dense in training) and
evaluation can route each token to the experts with q_e > 0 only.

Regularisers (training losses of the official code):
  * entropy λ·Σ_selectors H(r), H(r) = -Σ_e r_e log(r_e + 1e-6), pushes selectors to
    one-hot sooner (λ = 1e-6, the code's default schedule);
  * when E is not a power of two, Σ_selectors 1 / Σ_e r_e keeps the selector mass on
    reachable codes (codes E..2^m-1 name no expert).
The official code sums both over the batch; we average over tokens (and sum over
selectors), so λ does not change with batch size or sequence length. Multiply λ by the
number of tokens per batch to match the code.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moe_jax.routing.metrics import entropy
from moe_jax.routing.tokens_choice import finish_token_routing
from moe_jax.routing.types import Routing

Array = jax.Array
EPSILON = 1e-6   # inside the entropy log, as in the official code


def num_code_bits(num_experts: int) -> int:
  """m = ceil(log2 E): binary variables per selector (0 when E = 1)."""
  if num_experts < 1:
    raise ValueError(f'num_experts must be >= 1, got {num_experts}.')
  return math.ceil(math.log2(num_experts))


def binary_codes(num_experts: int) -> Array:
  """[E, m] bool, row e = the m-bit binary code of e, most significant bit first."""
  m = num_code_bits(num_experts)
  shifts = jnp.arange(m - 1, -1, -1, dtype=jnp.int32)
  return ((jnp.arange(num_experts, dtype=jnp.int32)[:, None] >> shifts) & 1).astype(bool)


def smooth_step(t: Array, gamma: float = 1.0) -> Array:
  """The cubic smooth-step S(t) with transition width γ (elementwise)."""
  t = t.astype(jnp.float32)
  cubic = -2.0 / gamma ** 3 * t ** 3 + 3.0 / (2.0 * gamma) * t + 0.5
  return jnp.where(t <= -gamma / 2, 0.0, jnp.where(t >= gamma / 2, 1.0, cubic))


def selector_outputs(z: Array, num_experts: int, gamma: float = 1.0) -> Array:
  """Single-expert selectors r(z).

  Args:
    z: [..., k, m] selector logits, m = ceil(log2 E).
  Returns:
    [..., k, E]; each row sums to 1 when E is a power of two, to <= 1 otherwise.
  """
  m = num_code_bits(num_experts)
  if z.shape[-1] != m:
    raise ValueError(f'DSelect-k with {num_experts} experts needs {m} code bits per selector, '
                     f'got z of shape {z.shape}.')
  s = smooth_step(z, gamma)[..., None, :]                      # [..., k, 1, m]
  factors = jnp.where(binary_codes(num_experts), s, 1.0 - s)   # [..., k, E, m]
  return jnp.prod(factors, axis=-1)


def expert_weights(z: Array, w: Array, num_experts: int, gamma: float = 1.0):
  """q = Σ_i softmax(w)_i r(z^(i)).

  Args:
    z: [..., k, m] selector logits.
    w: [..., k] selector weight logits.
  Returns:
    (q [..., E], r [..., k, E]).
  """
  r = selector_outputs(z, num_experts, gamma)
  alpha = jax.nn.softmax(w.astype(jnp.float32), axis=-1)
  return jnp.einsum('...k,...ke->...e', alpha, r, precision=jax.lax.Precision.HIGHEST), r


def selector_entropy(r: Array) -> Array:
  """Mean over tokens of Σ_selectors -Σ_e r log(r + 1e-6).  r: [..., k, E]."""
  h = -jnp.sum(r * jnp.log(r + EPSILON), axis=-1)
  return jnp.mean(jnp.sum(h, axis=-1))


def reachability_penalty(r: Array) -> Array:
  """Mean over tokens of Σ_selectors 1 / Σ_e r_e (>= k, = k when all mass is reachable).

  Σ_e r_e is floored at 1e-6: a selector locked on an unreachable code would otherwise
  give an infinite loss (the official code has no floor).
  """
  return jnp.mean(jnp.sum(1.0 / jnp.maximum(jnp.sum(r, axis=-1), EPSILON), axis=-1))


def dselect_k(z: Array, w: Array, *, num_experts: int, gamma: float = 1.0,
              entropy_weight: float = 1e-6, reachability_weight: float = 1.0,
              sparse: bool = False, capacity: int | None = None) -> Routing:
  """DSelect-k routing of G groups of S tokens.

  Args:
    z: [G, S, k, m] selector logits (the static gate broadcasts its [k, m] parameters).
    w: [G, S, k] selector weight logits.
    num_experts: E.
    gamma: smooth-step width γ (paper and code default 1).
    entropy_weight: λ of the entropy regulariser (code default 1e-6; 0 turns it off).
    reachability_weight: coefficient of Σ 1/Σ_e r, used only when E is not a power of 2
      (the code adds it with coefficient 1).
    sparse: False (training): every token goes to every expert with weight q_e, a
      token-choice routing with K = E choices and C = S, so nothing is dropped.
      True (evaluation): each token goes to its top-k experts by q, only those with
      q_e > 0; exact once the selectors have converged (`truncated_weight` metric
      reports the weight left out before that).
    capacity: C for the sparse form (default S: no token is ever dropped).

  Returns:
    A sparse `Routing` (slot table) in either form.
  """
  g, s, k, _ = z.shape
  q, r = expert_weights(z, w, num_experts, gamma)              # [G, S, E], [G, S, k, E]
  raw = dict(selector_entropy=selector_entropy(r))
  weights = dict(selector_entropy=entropy_weight)
  if num_experts != 2 ** num_code_bits(num_experts):
    raw['reachability'] = reachability_penalty(r)
    weights['reachability'] = reachability_weight
  aux = {n: weights[n] * v for n, v in raw.items() if weights[n]}
  metrics = {f'{n}_loss': v for n, v in raw.items()}
  metrics['nonzero_experts_per_token'] = jnp.mean(jnp.sum(q > 0, axis=-1).astype(jnp.float32))
  metrics['reachable_weight'] = jnp.mean(jnp.sum(q, axis=-1))
  if sparse:
    top_w, top_e = jax.lax.top_k(q, min(k, num_experts))
    metrics['truncated_weight'] = jnp.mean(jnp.sum(q, -1) - jnp.sum(top_w, -1))
    return finish_token_routing(q, top_e, top_w, capacity=s if capacity is None else capacity,
                                mask=top_w > 0, aux_losses=aux, metrics=metrics)
  # Dense: expert e's slot c holds token c with weight q[c, e]. Built directly rather
  # than through assign_slots: the table is known without sorting anything.
  tokens = jnp.arange(s, dtype=jnp.int32)
  experts = jnp.arange(num_experts, dtype=jnp.int32)
  slot_token = jnp.broadcast_to(tokens, (g, num_experts, s))
  slot_weight = jnp.swapaxes(q, 1, 2)
  load = jnp.sum(q, axis=(0, 1))
  zero = jnp.zeros((), jnp.float32)
  metrics.update(dropped_fraction=zero,
                 unrouted_fraction=jnp.mean((jnp.sum(q, -1) <= 0).astype(jnp.float32)),
                 expert_load=load / jnp.maximum(jnp.sum(load), 1e-9), router_entropy=entropy(q))
  return Routing(num_tokens=s, slot_token=slot_token, slot_weight=slot_weight,
                 token_expert=jnp.broadcast_to(experts, (g, s, num_experts)), token_weight=q,
                 token_slot=jnp.broadcast_to(experts * s + tokens[:, None], (g, s, num_experts)),
                 aux_losses=aux, metrics=metrics)

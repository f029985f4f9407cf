"""BASE layers (Lewis, Bhosale, Dettmers, Goyal, Zettlemoyer 2021, arXiv 2103.16716).

Training solves a balanced linear assignment per routing group:

    maximise  Σ_t  h_t · w_{a_t}    subject to  every expert receiving exactly k = S / E tokens

The paper (fairseq libbase) uses an auction algorithm that stops after 100 rounds with
an approximation. We solve the same problem *exactly* by successive shortest augmenting
paths, the row-by-row scheme of the Hungarian method specialised to E "columns" with
capacity k each (`lax.fori_loop` over tokens):

* the tokens inserted so far are optimally assigned under capacities <= k;
* token t joins expert e1, possibly pushing a token of e1 to e2, one of e2 to e3, ...,
  ending at an expert with a free slot; the chain of maximal total gain is found by
  Bellman-Ford on the E-node graph whose edge e -> e' is the best gain
  A[u, e'] - A[u, e] over tokens u now held by e (no positive cycle exists, since the
  partial assignment is optimal, so the best chain is a simple path of <= E experts);
* after S insertions every expert holds exactly k tokens and the total is optimal.

Cost: S sequential steps of O(S·E + E²·L) (L: Bellman-Ford passes, <= E - 1, usually a
few). Float32 ties may pick a different optimal assignment than scipy; the total agrees.

The assignment carries no gradient; the combine weight is σ(h·w_e) (see `base_routing`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing.tokens_choice import finish_token_routing
from moe_jax.routing.types import Routing

Array = jax.Array


def _check_divisible(num_tokens: int, num_experts: int):
  if num_tokens % num_experts:
    raise ValueError(
        f'BASE assigns exactly S/E tokens to every expert, but S={num_tokens} tokens per group '
        f'is not divisible by E={num_experts} experts; change the group size (MoeLayer '
        f'group_size), the sequence length / number of patches, or num_experts.')


def _best_moves(scores: Array, assign: Array):
  """Best single-token move between every pair of experts.

  scores: [S, E]; assign: [S] expert of each token, E if not inserted yet.
  Returns gain [E, E'] (-inf where e holds no token, and on the diagonal) and the token
  achieving it [E, E'] (lowest index on ties).
  """
  s, e = scores.shape
  held = assign < e
  seg = jnp.where(held, assign, e)
  own = jnp.take_along_axis(scores, jnp.minimum(assign, e - 1)[:, None], axis=1)
  diff = jnp.where(held[:, None], scores - own, -jnp.inf)                # [S, E']
  gain = jax.ops.segment_max(diff, seg, num_segments=e + 1)[:e]
  gain = jnp.where(jnp.eye(e, dtype=bool), -jnp.inf, gain)
  hit = held[:, None] & (diff == gain[jnp.minimum(seg, e - 1)])
  tok = jnp.arange(s, dtype=jnp.int32)[:, None]
  best_tok = jax.ops.segment_min(jnp.where(hit, tok, s), seg, num_segments=e + 1)[:e]
  return gain, best_tok


def _longest_chains(start: Array, gain: Array):
  """Bellman-Ford for maximal gain. start: [E] gain of joining each expert directly.

  Returns dist [E] and pred [E] (-1: joined directly), stopping when nothing improves.
  """
  e = start.shape[0]

  def relax(state):
    dist, pred, _, n = state
    cand = dist[:, None] + gain                                           # [E, E']
    val, arg = jnp.max(cand, axis=0), jnp.argmax(cand, axis=0).astype(jnp.int32)
    better = val > dist
    return jnp.where(better, val, dist), jnp.where(better, arg, pred), jnp.any(better), n + 1

  init = (start, jnp.full((e,), -1, jnp.int32), jnp.bool_(True), jnp.int32(0))
  dist, pred, _, _ = jax.lax.while_loop(lambda st: st[2] & (st[3] < e - 1), relax, init)
  return dist, pred


def _assign_group(scores: Array) -> Array:
  """One group. scores: [S, E] float32 -> expert [S] int32, each expert exactly S/E times."""
  s, e = scores.shape
  k = s // e

  def insert(t, carry):
    assign, load = carry
    gain, best_tok = _best_moves(scores, assign)
    dist, pred = _longest_chains(scores[t], gain)
    target = jnp.argmax(jnp.where(load < k, dist, -jnp.inf)).astype(jnp.int32)

    def walk(j, w):   # back from target to the expert t joins, recording the moves
      cur, done, first, move_tok, move_to = w
      p = pred[cur]
      stop, move = (~done) & (p < 0), (~done) & (p >= 0)
      move_tok = move_tok.at[j].set(jnp.where(move, best_tok[jnp.maximum(p, 0), cur], s))
      move_to = move_to.at[j].set(cur)
      return jnp.where(move, p, cur), done | stop, jnp.where(stop, cur, first), move_tok, move_to

    init = (target, jnp.bool_(False), target, jnp.full((e,), s, jnp.int32), jnp.zeros((e,), jnp.int32))
    _, done, first, move_tok, move_to = jax.lax.fori_loop(0, e, walk, init)
    # A chain that does not close within E steps can only come from float round-off
    # cycles; then t simply takes the free slot (still balanced).
    assign = assign.at[jnp.where(done, move_tok, s)].set(move_to, mode='drop')
    assign = assign.at[t].set(jnp.where(done, first, target))
    return assign, load.at[target].add(1)

  init = (jnp.full((s,), e, jnp.int32), jnp.zeros((e,), jnp.int32))
  assign, _ = jax.lax.fori_loop(0, s, insert, init)
  return assign


def balanced_assignment(scores: Array) -> Array:
  """Optimal balanced assignment of tokens to experts, per group.

  Args:
    scores: [G, S, E] affinities (no gradient is taken through the result). Non-finite
      scores are replaced by the group's smallest finite score (as fairseq does).

  Returns:
    [G, S] int32 expert per token, every expert exactly S/E times in every group, with
    the maximal total affinity.
  """
  scores = jax.lax.stop_gradient(scores).astype(jnp.float32)
  _check_divisible(scores.shape[1], scores.shape[2])
  finite = jnp.isfinite(scores)
  lo = jnp.min(jnp.where(finite, scores, jnp.inf), axis=(1, 2), keepdims=True)
  return jax.vmap(_assign_group)(jnp.where(finite, scores, lo))


def base_routing(logits: Array, *, train: bool = True, capacity: int | None = None) -> Routing:
  """BASE routing from token-expert affinities.

  Args:
    logits: [G, S, E] affinities h_t · w_e (float32; gradient flows to the gate only).
    train: balanced assignment (True) or greedy top-1 (evaluation, the paper's test-time
      rule: no balancing).
    capacity: C. Training uses exactly S/E (nothing dropped). Evaluation default: S (no
      drops, as in the paper; set a smaller C to bound compute).

  Returns:
    A sparse `Routing`, combine weight σ(h_t · w_e) of the chosen expert. The residual
    h_t of the paper's h_t + σ(h_t·w_e) f_e(h_t) is the transformer block's own.
  """
  logits = logits.astype(jnp.float32)
  g, s, e = logits.shape
  if train:
    expert = balanced_assignment(logits)
    capacity = s // e
  else:
    expert = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    capacity = s if capacity is None else capacity
  expert = expert[..., None]                                            # [G, S, 1]
  weight = jax.nn.sigmoid(jnp.take_along_axis(logits, expert, axis=-1))
  probs = jax.nn.softmax(logits, axis=-1)
  return finish_token_routing(probs, expert, weight, capacity=capacity)

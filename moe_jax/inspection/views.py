"""Per-token views of every MoE layer's routing: what the pictures are drawn from.

    views = routing_views(model, task.model_inputs(batch))      # runs the model once
    v = views['block_03']
    v['weight']       # [B, S, E] combine weight each expert gives each token
    v['dispatched']   # [B, S, E] the token's dispatch mass into each expert's slots
                      #           (sparse routers: how many of its slots; Soft MoE: Σ_p D)
    v['dropped']      # [B, S] requested choices that found no slot (token-choice routers)
    # dense (Soft MoE) layers also:
    v['slot_dispatch']  # [B, S, E·P] each slot's dispatch weights over its group's tokens
    v['slot_combine']   # [B, S, E·P] each token's combine weights over the slots

Every router's `Routing` becomes the same arrays in the batch's own token order, whatever
its form (slot table or dense), its routing groups (`group_size` regroups B·S tokens)
and its token shuffle (BASE layers in training). `token_views` runs inside a traced
function (the trainer's eval step); `routing_views` is the eager entry point of the
scripts. Imports jax and flax only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax import layers

Array = jax.Array


def _to_batch(a: Array, perm: Array | None, batch_shape: tuple[int, int]) -> Array:
  """a: [G, S', ...] in routed order -> [B, S, ...] in the batch's order."""
  b, s = batch_shape
  flat = a.reshape(-1, *a.shape[2:])
  if perm is not None:        # routed position p holds token perm[p]
    flat = flat[jnp.argsort(perm)]
  return flat.reshape(b, s, *a.shape[2:])


def token_view(record: layers.RoutingRecord, num_examples: int | None = None) -> dict[str, Array]:
  """One layer's `RoutingRecord` -> the per-token arrays of the module docstring, for the
  first `num_examples` examples of the batch (all when None)."""
  r = record.routing
  g, s, e = r.num_groups, r.num_tokens, r.num_experts
  if r.is_sparse:
    gi = jnp.arange(g)[:, None, None]
    ei = jnp.arange(e)[None, :, None]
    tok = r.slot_token                                           # [G, E, C]; S = empty
    zeros = jnp.zeros((g, s + 1, e), jnp.float32)
    out = dict(weight=zeros.at[gi, tok, ei].add(r.slot_weight.astype(jnp.float32))[:, :s],
               dispatched=zeros.at[gi, tok, ei].add(1.0)[:, :s])
    if r.token_slot is not None:
      # A masked (never requested) choice also has no slot, but its weight is 0.
      lost = (r.token_slot >= e * r.capacity) & (r.token_weight != 0)
      out['dropped'] = jnp.sum(lost, axis=-1).astype(jnp.float32)
    else:
      out['dropped'] = jnp.zeros((g, s), jnp.float32)
  else:
    dispatch, combine = r.dense()                                # [G, S, E, P]
    out = dict(weight=jnp.sum(combine, -1), dispatched=jnp.sum(dispatch, -1),
               dropped=jnp.zeros((g, s), jnp.float32),
               slot_dispatch=dispatch.reshape(g, s, -1), slot_combine=combine.reshape(g, s, -1))
  out = {k: _to_batch(v, record.perm, record.batch_shape) for k, v in out.items()}
  return {k: v[:num_examples] for k, v in out.items()}


def token_views(records: list[layers.RoutingRecord],
                num_examples: int | None = None) -> dict[str, dict[str, Array]]:
  """{layer name: `token_view`} for the records of one model call (unnamed layers:
  'moe_0', 'moe_1', ... in call order)."""
  return {rec.name or f'moe_{i}': token_view(rec, num_examples) for i, rec in enumerate(records)}


def routing_views(model: nnx.Module, inputs: dict, *,
                  num_examples: int | None = None) -> dict[str, dict[str, np.ndarray]]:
  """Runs `model(**inputs)` once (jitted, in the model's current train / eval mode) and
  returns every MoE layer's `token_view` as numpy arrays. {} under expert parallelism."""

  @nnx.jit
  def capture(model, inputs):
    with layers.recording_routings() as records:
      model(**inputs)
    return token_views(records, num_examples)

  return jax.tree.map(np.asarray, capture(model, inputs))


def top_expert(view: dict[str, np.ndarray]) -> np.ndarray:
  """[B, S] int: the expert giving each token the largest combine weight among those that
  took it (-1: no expert took it). Host-side (numpy)."""
  took = view['dispatched'] > 0
  score = np.where(took, view['weight'], -np.inf)
  top = np.argmax(score, axis=-1)
  return np.where(took.any(-1), top, -1)

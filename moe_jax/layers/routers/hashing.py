"""`HashRouter`: Hash layers (Roller et al. 2021), registry name 'hash'.

    layer = MoeLayer(d, E, h, router='hash', router_kwargs=dict(kind='random'), rngs=...)
    y, aux = layer(x, token_ids=ids)          # ids: [B, S] int, the model's input tokens

No parameters, no aux loss, combine weight 1; `routing.hashing` documents the kinds.
The router stores its lookup table (if any) and its hash seed as non-trainable
`HashState` variables, so they are checkpointed with the model but never optimised.

MultiHash (kind='multihash', num_hashes=N) over E experts of hidden h is built as
`MoeLayer(num_experts=N*E, expert_hidden=h//N, ...)`: the N·E "experts" are the N
segments of each real expert (segment i of expert j = hidden units [i·h/N, (i+1)·h/N)
of its first layer and the matching rows of its second), and a token is sent, with
weight 1, to segment i of expert hash_i(x) for every i. The outputs are summed, i.e.

    y = Σ_i B^i_{k_i} relu(A^i_{k_i} h),     k_i = hash_i(x)

Same parameters (up to N-1 extra output biases per expert) and the FLOPs of one expert.
The paper writes v = relu([A^1_{k_1} h; ...; A^N_{k_N} h]), y = [B^1_{k_1} v; ...;
B^N_{k_N} v], i.e. it splits the *second* layer by output rows, so each output segment
reads the hidden units of all N chosen experts. That cross-expert read does not fit one
dispatch -> per-expert MLP -> combine pass, so we split the second layer by hidden
units instead (both are "segment i of each expert from hash_i").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.layers.moe_config import LayerContext
from moe_jax.layers.routers.base import Router
from moe_jax.routing import CapacitySpec, hashing
from moe_jax.routing.types import Routing

Array = jax.Array


class HashState(nnx.Variable):
  """Fixed router state (hash table, seed): saved with the model, never trained."""


class HashRouter(Router):
  """Hash routing by input token id.

  router_kwargs:
    kind: one of `routing.hashing.HASH_KINDS` (default 'random').
    table: [V] int array (or [N, V] for 'multihash') from the table builders in
      `routing.hashing`, required by 'balanced', 'clustered', 'dispersed'.
    table_path: alternatively a .npy file with that table (`hashing.save_table`).
    seed: int fixing the hash function; None (default) draws it from the `params` rng
      stream, so every layer of a model hashes differently.
    num_hashes: N for 'multihash' (default 2); num_experts must be N × real experts.
    the capacity keywords: none by default = no drops (C = S, as in the paper, whose
      layers have no capacity); capacity_factor caps C = ceil(K·S·cf/E) and drops in
      token order. With the einsum/gather engines C = S costs E× the expert FLOPs of a
      balanced top-1 layer; use the dropless engine or set a capacity for speed.
  """
  routing_fn = staticmethod(hashing.hash_routing)
  default_capacity = CapacitySpec()
  needs_token_ids = True

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs,
               context: LayerContext | None = None, kind: str = 'random', table=None,
               table_path: str | None = None, seed: int | None = None, num_hashes: int = 2,
               **kwargs):
    if kind not in hashing.HASH_KINDS:
      raise ValueError(f'unknown hash kind {kind!r}; choose one of {hashing.HASH_KINDS}.')
    if table is not None and table_path is not None:
      raise ValueError('pass either table or table_path to the hash router, not both.')
    if table_path is not None:
      table = hashing.load_table(table_path)
    if kind in hashing.TABLE_KINDS and table is None:
      raise ValueError(f"hash kind {kind!r} needs a table built from data: build it with "
                       f"routing.hashing.build_{kind}_table(...) and pass router_kwargs "
                       f"table=... or table_path='table.npy' (hashing.save_table).")
    if table is not None and kind not in hashing.TABLE_KINDS + ('random', 'multihash'):
      raise ValueError(f'hash kind {kind!r} computes its hash from token ids; it takes no table.')
    self.num_experts, self.kind = num_experts, kind
    self.num_hashes = num_hashes if kind == 'multihash' else 1
    if kind == 'multihash' and (num_hashes < 1 or num_experts % num_hashes):
      raise ValueError(f'multihash: num_experts={num_experts} must be num_hashes={num_hashes} x '
                       f'the number of real experts (MoeLayer(num_experts=N*E, expert_hidden=h//N)).')
    self.table = HashState(self._checked_table(table)) if table is not None else nnx.data(None)
    if seed is None:
      seed = jax.random.bits(rngs.params(), (), jnp.uint32)
    self.seed = HashState(jnp.asarray(seed).astype(jnp.uint32))
    super().__init__(d_model, num_experts, rngs=rngs, context=context, kwargs=kwargs)
    self.needs_token_ids = kind != 'position'

  def _checked_table(self, table) -> Array:
    if isinstance(table, jax.core.Tracer):      # a traced table cannot be checked here
      return table.astype(jnp.int32)
    table = np.asarray(jax.device_get(table))   # host-side check, works under nnx.eval_shape
    want_ndim = 2 if self.kind == 'multihash' else 1
    buckets = self.num_experts // self.num_hashes
    if table.ndim != want_ndim:
      raise ValueError(f'hash kind {self.kind!r} needs a table of rank {want_ndim}, got shape {table.shape}.')
    lo, hi = int(table.min()), int(table.max())
    if lo < 0 or hi >= buckets:
      raise ValueError(f'hash table values must lie in [0, {buckets}), got [{lo}, {hi}]; was it '
                       f'built for a different number of experts?')
    return jnp.asarray(table, jnp.int32)

  @property
  def is_causal(self) -> bool:
    return self.kind in hashing.CAUSAL_KINDS

  def __call__(self, x: Array, *, token_ids: Array | None = None) -> Routing:
    """x: [G, S, d] (only its shape is read); token_ids: [G, S] int."""
    g, s = x.shape[:2]
    if token_ids is None and self.needs_token_ids:
      raise ValueError(f'hash router kind {self.kind!r} needs token_ids: call layer(x, token_ids=ids).')
    if token_ids is not None and token_ids.shape != (g, s):
      raise ValueError(f'token_ids must have shape {(g, s)} (one id per token), got {token_ids.shape}.')
    table = None if self.table is None else self.table[...]
    expert = hashing.hash_experts(token_ids, self.num_experts, kind=self.kind, table=table,
                                  seed=self.seed[...], num_hashes=self.num_hashes, num_tokens=s)
    expert = jnp.broadcast_to(expert, (g, s, expert.shape[-1]))
    return hashing.hash_routing(expert, self.num_experts,
                                capacity=self.slots(s, k=expert.shape[-1]))

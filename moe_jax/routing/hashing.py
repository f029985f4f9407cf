"""Hash routing (Roller, Sukhbaatar, Szlam, Weston 2021, "Hash Layers For Large Sparse
Models", arXiv 2106.04426).

    expert(t) = hash(token ids around t)      fixed before training, no parameters
    y_t = FFN_expert(t)(h_t)                  combine weight 1 (no gate), no aux loss

The key is the *input token id* (not the hidden state), so routing is identical in
training and evaluation. Kinds (`HASH_KINDS`, causal unless noted):

* 'random': a fixed pseudo-random function id -> expert (`mix32(id) mod E`; the
  paper's random lookup table, which `random_table` materialises), or a given table.
* 'balanced', 'clustered', 'dispersed': lookup in a table built from data
  (`build_balanced_table`, `build_clustered_table`, `build_dispersed_table`).
* 'bigram': hash of (x_{t-1}, x_t); 'previous': hash of x_{t-1}; position 0 reads a
  begin-of-sequence key. Both assume one routing group = one sequence.
* 'position': hash of the position t in the routing group (no token ids needed).
* 'next': hash of x_{t+1}, the paper's "oracle future hash". NOT causal: analysis only.
* 'multihash': N independent hashes, see `hash_experts`.

Table builders run once on the host before training; everything else is jit-able.
"""
from __future__ import annotations

import functools
import heapq
from typing import Iterable

import jax
import jax.numpy as jnp

from moe_jax.routing.capacity import compute_capacity
from moe_jax.routing.tokens_choice import finish_token_routing
from moe_jax.routing.types import Routing

Array = jax.Array

HASH_KINDS = ('random', 'balanced', 'clustered', 'dispersed', 'bigram', 'previous', 'position',
              'next', 'multihash')
TABLE_KINDS = ('balanced', 'clustered', 'dispersed')   # need a table built from data
CAUSAL_KINDS = tuple(k for k in HASH_KINDS if k != 'next')
BOS_KEY = -1            # key read by 'previous'/'bigram' at t = 0 and by 'next' at t = S-1


def mix32(x: Array, seed: int | Array = 0) -> Array:
  """A fixed pseudo-random bijection of 32-bit integers (MurmurHash3's finaliser).

  x: any int array -> uint32 array of the same shape. Different seeds (an int or a
  uint32 scalar array) give independent-looking functions.
  """
  salt = jnp.asarray(seed).astype(jnp.uint32) * jnp.uint32(0x9E3779B9)
  h = jnp.asarray(x).astype(jnp.uint32) ^ salt
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hash_bucket(keys: Array, num_buckets: int, seed: int | Array = 0) -> Array:
  """keys: int array -> int32 buckets in [0, num_buckets), pseudo-random and fixed."""
  return (mix32(keys, seed) % jnp.uint32(num_buckets)).astype(jnp.int32)


def random_table(vocab_size: int, num_experts: int, seed: int = 0) -> Array:
  """[V] int32: the 'random' hash as an explicit lookup table (same values the router uses)."""
  return hash_bucket(jnp.arange(vocab_size), num_experts, seed)


def _shift(ids: Array, offset: int) -> Array:
  """ids: [..., S]. offset=+1: previous token (BOS_KEY at t=0); -1: next token."""
  pad = jnp.full(ids.shape[:-1] + (1,), BOS_KEY, ids.dtype)
  if offset > 0:
    return jnp.concatenate([pad, ids[..., :-1]], axis=-1)
  return jnp.concatenate([ids[..., 1:], pad], axis=-1)


def _lookup(table: Array, ids: Array) -> Array:
  """table: [V] int; ids: any int array. Ids outside [0, V) wrap modulo V."""
  return jnp.take(table, jnp.mod(ids, table.shape[0]), axis=0).astype(jnp.int32)


def hash_experts(token_ids: Array | None, num_experts: int, *, kind: str = 'random',
                 table: Array | None = None, seed: int | Array = 0, num_hashes: int = 1,
                 num_tokens: int | None = None) -> Array:
  """The expert(s) of every token.

  Args:
    token_ids: [G, S] int token ids (unused by 'position', which may pass None with
      `num_tokens`).
    num_experts: E. For 'multihash', E counts expert *segments*: E = N · E_real.
    kind: one of `HASH_KINDS`.
    table: [V] int lookup table (required by `TABLE_KINDS`, optional for 'random'); for
      'multihash' optionally [N, V], one table per hash (values in [0, E / N)).
    seed: selects the pseudo-random function (per-layer seeds give per-layer hashes).
    num_hashes: N, only for 'multihash'.
    num_tokens: S, for 'position' without token ids.

  Returns:
    [G, S, K] int32 expert index; K = N for 'multihash' (choice i lies in segment block
    [i · E/N, (i+1) · E/N)), else K = 1.
  """
  if kind not in HASH_KINDS:
    raise ValueError(f'unknown hash kind {kind!r}; choose one of {HASH_KINDS}.')
  if kind in TABLE_KINDS and table is None:
    raise ValueError(f"hash kind {kind!r} needs a table built from data: see "
                     f"routing.hashing.build_{kind}_table, then pass table=... or table_path=...")
  if kind == 'position':
    if token_ids is not None:
      num_tokens = token_ids.shape[-1]
    positions = jnp.arange(num_tokens)
    buckets = hash_bucket(positions, num_experts, seed)
    shape = (1, num_tokens) if token_ids is None else token_ids.shape
    return jnp.broadcast_to(buckets, shape)[..., None]
  ids = jnp.asarray(token_ids).astype(jnp.int32)
  if kind == 'multihash':
    if num_hashes < 1 or num_experts % num_hashes:
      raise ValueError(f'multihash needs num_experts ({num_experts}) divisible by num_hashes '
                       f'({num_hashes}): E counts expert segments, E = num_hashes x real experts.')
    per = num_experts // num_hashes
    if table is not None:
      table = jnp.asarray(table)
      if table.ndim != 2 or table.shape[0] != num_hashes:
        raise ValueError(f'multihash table must be [num_hashes={num_hashes}, V], got {table.shape}.')
      cols = [_lookup(table[i], ids) for i in range(num_hashes)]
    else:
      cols = [hash_bucket(ids, per, seed + i) for i in range(num_hashes)]
    return jnp.stack([c + i * per for i, c in enumerate(cols)], axis=-1)
  if kind in TABLE_KINDS or (kind == 'random' and table is not None):
    buckets = _lookup(jnp.asarray(table), ids)
  elif kind == 'random':
    buckets = hash_bucket(ids, num_experts, seed)
  elif kind == 'previous':
    buckets = hash_bucket(_shift(ids, 1), num_experts, seed)
  elif kind == 'next':
    buckets = hash_bucket(_shift(ids, -1), num_experts, seed)
  else:   # bigram: a hash of the pair, not a sum of two hashes
    buckets = hash_bucket(mix32(_shift(ids, 1), seed + 1) ^ ids.astype(jnp.uint32), num_experts, seed)
  return buckets[..., None]


def hash_routing(expert_index: Array, num_experts: int, *, capacity_factor: float | None = None,
                 capacity: int | None = None) -> Routing:
  """Routing with combine weight 1 for hashed experts, no aux loss.

  Args:
    expert_index: [G, S, K] int from `hash_experts`.
    num_experts: E (segments for multihash).
    capacity_factor: None (default) = no token is ever dropped (C = S; the paper has no
      capacity). A number gives C = ceil(K · S · capacity_factor / E); overflow is dropped
      in token order, which keeps routing causal.
    capacity: explicit C (overrides `capacity_factor`).
  """
  g, s, k = expert_index.shape
  if capacity is None:
    capacity = s if capacity_factor is None else compute_capacity(s, num_experts, capacity_factor, k=k)
  weight = jnp.ones(expert_index.shape, jnp.float32)
  # The "router distribution" of a hash is the one-hot of its choice(s) (entropy 0).
  probs = jnp.mean(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32), axis=2)
  return finish_token_routing(probs, expert_index, weight, capacity=capacity)


# ---------------------------------------------------------------------------------------
# Tables from data (host side, run once before training).

def token_frequencies(token_id_batches: Iterable, vocab_size: int) -> Array:
  """[V] uint32 counts of every token id over an iterable of int arrays (any shapes).

  Ids outside [0, V) are ignored (e.g. padding -1). Counts saturate past 2^32 - 1.
  """
  counts = jnp.zeros(vocab_size, jnp.uint32)
  for batch in token_id_batches:
    ids = jnp.asarray(batch).reshape(-1)
    valid = (ids >= 0) & (ids < vocab_size)
    counts = counts + jnp.bincount(jnp.where(valid, ids, 0), weights=valid.astype(jnp.float32),
                                   length=vocab_size).astype(jnp.uint32)
  return counts


def balanced_table_from_counts(counts, num_experts: int) -> Array:
  """Greedy balanced assignment: tokens in decreasing frequency (ties: lower id first),
  each to the bucket with the least frequency mass so far (ties: fewer tokens, then lower
  bucket index, so unseen tokens spread round-robin instead of piling into one bucket).

  counts: [V] non-negative frequencies -> [V] int32 table.
  """
  counts = [int(c) for c in jnp.asarray(counts).tolist()]
  order = sorted(range(len(counts)), key=lambda v: (-counts[v], v))
  heap = [(0, 0, e) for e in range(num_experts)]
  table = [0] * len(counts)
  for v in order:
    mass, n, e = heapq.heappop(heap)
    table[v] = e
    heapq.heappush(heap, (mass + counts[v], n + 1, e))
  return jnp.asarray(table, jnp.int32)


def build_balanced_table(token_id_batches: Iterable, vocab_size: int, num_experts: int) -> Array:
  """The paper's "balanced assignment" hash from training-data token frequencies."""
  return balanced_table_from_counts(token_frequencies(token_id_batches, vocab_size), num_experts)


@functools.partial(jax.jit, static_argnums=2)
def kmeans(points: Array, init_centroids: Array, num_iters: int = 20) -> tuple[Array, Array]:
  """Lloyd's k-means (squared Euclidean). An empty cluster keeps its previous centroid.

  points: [V, d]; init_centroids: [k, d] -> (centroids [k, d], labels [V] int32).
  """
  x = jnp.asarray(points, jnp.float32)
  k = init_centroids.shape[0]

  def labels_of(c):
    d2 = (jnp.sum(x * x, 1)[:, None] - 2 * jnp.dot(x, c.T, precision=jax.lax.Precision.HIGHEST)
          + jnp.sum(c * c, 1)[None, :])
    return jnp.argmin(d2, axis=1).astype(jnp.int32)

  def step(_, c):
    lab = labels_of(c)
    sums = jax.ops.segment_sum(x, lab, num_segments=k)
    n = jax.ops.segment_sum(jnp.ones_like(lab, jnp.float32), lab, num_segments=k)
    return jnp.where(n[:, None] > 0, sums / jnp.maximum(n, 1.0)[:, None], c)

  c = jax.lax.fori_loop(0, num_iters, step, jnp.asarray(init_centroids, jnp.float32))
  return c, labels_of(c)


@functools.partial(jax.jit, static_argnums=1)
def _kmeans_plus_plus(x: Array, k: int, key: Array) -> Array:
  keys = jax.random.split(key, k)
  first = jax.random.randint(keys[0], (), 0, x.shape[0])

  def pick(i, carry):
    chosen, d2 = carry
    nxt = jax.random.categorical(keys[i], jnp.log(jnp.maximum(d2, 1e-30)))
    chosen = chosen.at[i].set(x[nxt])
    return chosen, jnp.minimum(d2, jnp.sum((x - x[nxt]) ** 2, axis=1))

  chosen = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(x[first])
  d2 = jnp.sum((x - x[first]) ** 2, axis=1)
  return jax.lax.fori_loop(1, k, pick, (chosen, d2))[0]


def kmeans_plus_plus(points: Array, k: int, seed: int = 0) -> Array:
  """k-means++ seeding (Arthur and Vassilvitskii 2007): each next centroid is a point
  drawn with probability proportional to its squared distance to the nearest chosen one.

  points: [V, d] -> [k, d] float32.
  """
  x = jnp.asarray(points, jnp.float32)
  if k > x.shape[0]:
    raise ValueError(f'cannot make {k} clusters from {x.shape[0]} embeddings.')
  return _kmeans_plus_plus(x, k, jax.random.key(seed))


def build_clustered_table(embeddings, num_experts: int, *, num_iters: int = 20,
                          seed: int = 0) -> Array:
  """"Clustered hash": k-means (k-means++ seeding) with E clusters on token embeddings
  (e.g. from a trained dense baseline); cluster c -> expert c, so similar tokens share
  an expert.

  embeddings: [V, d] -> [V] int32 table.
  """
  emb = jnp.asarray(embeddings, jnp.float32)
  _, labels = kmeans(emb, kmeans_plus_plus(emb, num_experts, seed), num_iters)
  return labels


def build_dispersed_table(embeddings, num_experts: int, *, num_clusters: int | None = None,
                          num_iters: int = 20, seed: int = 0) -> Array:
  """"Dispersed hash": k-means into |V|/E clusters (default), then the tokens of every
  cluster (in id order) are dealt round-robin over the experts with one running counter,
  so similar tokens go to different experts and expert sizes differ by at most one token.

  embeddings: [V, d] -> [V] int32 table.
  """
  emb = jnp.asarray(embeddings, jnp.float32)
  v = emb.shape[0]
  num_clusters = num_clusters or max(1, -(-v // num_experts))
  _, labels = kmeans(emb, kmeans_plus_plus(emb, num_clusters, seed), num_iters)
  order = jnp.lexsort((jnp.arange(v), labels))        # by cluster, then by token id
  return jnp.zeros(v, jnp.int32).at[order].set(jnp.arange(v, dtype=jnp.int32) % num_experts)


def save_table(path: str, table) -> None:
  """Writes a table as .npy (pass the path as router_kwargs table_path=...)."""
  jnp.save(path, jnp.asarray(table, jnp.int32))


def load_table(path: str) -> Array:
  return jnp.asarray(jnp.load(path), jnp.int32)

"""Hash layers (Roller et al. 2021): hash functions, tables from data, routing."""
import numpy as np
import pytest
from scipy.cluster.vq import kmeans2

import jax
import jax.numpy as jnp
from moe_jax.routing import hashing


def np_fmix32(x, seed):
  """MurmurHash3 fmix32 with a seed salt, written from the published algorithm."""
  m = 0xFFFFFFFF
  h = (np.asarray(x).astype(np.int64) & m) ^ ((seed * 0x9E3779B9) & m)
  h ^= h >> 16
  h = (h * 0x85EBCA6B) & m
  h ^= h >> 13
  h = (h * 0xC2B2AE35) & m
  return h ^ (h >> 16)


def np_bucket(keys, e, seed):
  return (np_fmix32(keys, seed) % e).astype(np.int64)


def test_mix32_matches_murmur3_finaliser():
  x = np.array([0, 1, 2, 12345, 2**31 - 1, -1, -7, 65536])
  for seed in (0, 7):
    np.testing.assert_array_equal(np.asarray(hashing.mix32(jnp.asarray(x), seed)), np_fmix32(x, seed))
  # A seed given as a uint32 array (the router's checkpointed seed) hashes the same way.
  np.testing.assert_array_equal(np.asarray(hashing.mix32(x, jnp.uint32(7))), np_fmix32(x, 7))
  # Known value: fmix32(1) with no salt.
  assert int(hashing.mix32(jnp.asarray([1]))[0]) == 0x514E28B7


def test_hash_kinds_against_numpy_reference():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 1000, size=(3, 9))
  e, seed = 5, 3
  prev = np.concatenate([np.full((3, 1), -1), ids[:, :-1]], axis=1)
  nxt = np.concatenate([ids[:, 1:], np.full((3, 1), -1)], axis=1)
  want = {
      'random': np_bucket(ids, e, seed),
      'previous': np_bucket(prev, e, seed),
      'next': np_bucket(nxt, e, seed),
      'bigram': np_bucket(np_fmix32(prev, seed + 1) ^ ids, e, seed),
      'position': np.broadcast_to(np_bucket(np.arange(9), e, seed), (3, 9)),
  }
  for kind, ref in want.items():
    got = hashing.hash_experts(jnp.asarray(ids), e, kind=kind, seed=seed)
    assert got.shape == (3, 9, 1)
    np.testing.assert_array_equal(np.asarray(got)[..., 0], ref, err_msg=kind)
  table = rng.integers(0, e, size=50)
  got = hashing.hash_experts(jnp.asarray(ids), e, kind='balanced', table=jnp.asarray(table))
  np.testing.assert_array_equal(np.asarray(got)[..., 0], table[ids % 50])
  np.testing.assert_array_equal(np.asarray(hashing.random_table(30, e, seed)), np_bucket(np.arange(30), e, seed))


def test_random_hash_spreads_tokens_uniformly():
  counts = np.bincount(np.asarray(hashing.random_table(8000, 8, 0)), minlength=8)
  assert counts.min() > 900 and counts.max() < 1100          # 1000 expected, sd ~30


def test_multihash_one_choice_per_segment_block():
  ids = jnp.arange(40).reshape(2, 20)
  got = np.asarray(hashing.hash_experts(ids, 12, kind='multihash', num_hashes=3, seed=1))
  assert got.shape == (2, 20, 3)
  for i in range(3):
    np.testing.assert_array_equal(got[..., i], i * 4 + np_bucket(np.asarray(ids), 4, 1 + i))
  tables = np.stack([np.arange(50) % 4, (np.arange(50) + 1) % 4])
  got = np.asarray(hashing.hash_experts(ids, 8, kind='multihash', num_hashes=2, table=jnp.asarray(tables)))
  np.testing.assert_array_equal(got[..., 1], 4 + (np.asarray(ids) + 1) % 4)
  with pytest.raises(ValueError, match='divisible by num_hashes'):
    hashing.hash_experts(ids, 10, kind='multihash', num_hashes=3)


@pytest.mark.parametrize('kind', hashing.HASH_KINDS)
def test_causality_of_each_kind(kind):
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 500, size=(1, 12))
  table = None
  if kind in hashing.TABLE_KINDS:
    table = jnp.asarray(rng.integers(0, 4, size=500))
  e = 8 if kind == 'multihash' else 4
  # Variants of the sequence with token t changed (40 new values for every t >= 1).
  pos = np.repeat(np.arange(1, 12), 40)
  mod = np.repeat(ids, len(pos), axis=0)
  mod[np.arange(len(pos)), pos] = (ids[0, pos] + 1 + np.tile(np.arange(40), 11)) % 500
  both = jnp.asarray(np.concatenate([ids, mod]))
  out = np.asarray(hashing.hash_experts(both, e, kind=kind, table=table, num_hashes=2))
  before = np.arange(12)[None, :] < pos[:, None]                 # positions before the change
  changed_before = bool(((out[1:] != out[:1]).any(-1) & before).any())
  assert changed_before == (kind not in hashing.CAUSAL_KINDS)


def np_greedy_balanced(counts, e):
  """Reference: tokens by decreasing count (then id) to the bucket with least mass
  (then fewest tokens, then lowest index)."""
  mass, n = [0] * e, [0] * e
  table = np.zeros(len(counts), int)
  for v in sorted(range(len(counts)), key=lambda v: (-counts[v], v)):
    b = min(range(e), key=lambda j: (mass[j], n[j], j))
    table[v] = b
    mass[b] += counts[v]
    n[b] += 1
  return table


def test_balanced_table_from_data():
  rng = np.random.default_rng(2)
  vocab, e = 200, 6
  zipf = np.minimum(rng.zipf(1.3, size=5000), vocab) - 1
  pad = np.full((25, 100), -1)
  pad[0, :3] = [vocab, 5, 5]                                     # out of range ids are ignored
  batches = [zipf[:2500].reshape(25, 100), zipf[2500:].reshape(25, 100), pad]
  counts = np.asarray(hashing.token_frequencies(iter(batches), vocab))
  ref_counts = np.bincount(np.concatenate([zipf, [5, 5]]), minlength=vocab)
  np.testing.assert_array_equal(counts, ref_counts)
  table = np.asarray(hashing.build_balanced_table(iter(batches), vocab, e))
  np.testing.assert_array_equal(table, np_greedy_balanced(ref_counts.tolist(), e))
  mass = np.bincount(table, weights=ref_counts, minlength=e)
  # Greedy (LPT) bound: the heaviest bucket exceeds the lightest by at most one token's count.
  assert mass.max() - mass.min() <= ref_counts.max()
  random_mass = np.bincount(np.asarray(hashing.random_table(vocab, e, 0)), weights=ref_counts, minlength=e)
  assert mass.max() - mass.min() < random_mass.max() - random_mass.min()
  # Unseen tokens add no mass: they go to the lightest buckets, round-robin among ties.
  unseen = table[ref_counts == 0]
  assert len(unseen) > e and set(unseen) <= set(np.flatnonzero(mass == mass.min()))


def grouped_embeddings(seed, groups=4, size=4, spread=0.01):
  """[groups·size, 3] embeddings in tight, well separated groups of `size` tokens."""
  rng = np.random.default_rng(seed)
  member = np.repeat(np.arange(groups), size)
  return (rng.normal(0, 10, size=(groups, 3))[member] + rng.normal(0, spread, size=(len(member), 3))
          ).astype(np.float32), member


def test_kmeans_matches_scipy():
  pts, _ = grouped_embeddings(3, spread=3.0)                   # overlapping groups
  init = pts[[0, 1, 2, 3]]
  cent, labels = hashing.kmeans(jnp.asarray(pts), jnp.asarray(init), 20)
  ref_cent, ref_labels = kmeans2(pts.astype(np.float64), init.astype(np.float64), iter=20, minit='matrix')
  np.testing.assert_array_equal(np.asarray(labels), ref_labels)
  np.testing.assert_allclose(np.asarray(cent), ref_cent, atol=1e-4)


def test_clustered_and_dispersed_tables():
  e = 4
  emb, member = grouped_embeddings(4)                           # 16 tokens, 4 tight groups
  clustered = np.asarray(hashing.build_clustered_table(emb, e, seed=0))
  for c in range(e):   # every group is one expert, and the groups use all experts
    assert len(set(clustered[member == c])) == 1
  assert len(set(clustered)) == e
  # Dispersed: |V|/E = 4 clusters (the groups); the 4 near-identical tokens of a group
  # go to 4 different experts.
  dispersed = np.asarray(hashing.build_dispersed_table(emb, e, seed=0))
  for c in range(e):
    assert sorted(dispersed[member == c]) == list(range(e))
  assert (np.bincount(dispersed, minlength=e) == 4).all()


def test_hash_routing_weights_and_capacity():
  route = jax.jit(hashing.hash_routing, static_argnums=1, static_argnames='capacity_factor')
  expert = jnp.zeros((1, 6, 1), jnp.int32)                       # everyone hashes to expert 0
  r = route(expert, 3)
  assert r.capacity == 6 and abs(float(r.metrics['dropped_fraction'])) < 1e-6   # default: no drops
  np.testing.assert_array_equal(np.asarray(r.slot_token[0, 0]), np.arange(6))
  np.testing.assert_array_equal(np.asarray(r.slot_weight[0, 0]), np.ones(6))
  assert r.aux_losses == {}
  r = route(expert, 3, capacity_factor=1.0)                      # C = ceil(6 / 3) = 2
  np.testing.assert_array_equal(np.asarray(r.slot_token[0, 0]), [0, 1])   # token order: causal
  np.testing.assert_allclose(float(r.metrics['dropped_fraction']), 4 / 6)


def test_table_kinds_need_a_table_and_tables_roundtrip(tmp_path):
  with pytest.raises(ValueError, match='build_balanced_table'):
    hashing.hash_experts(jnp.zeros((1, 3), jnp.int32), 4, kind='balanced')
  with pytest.raises(ValueError, match='unknown hash kind'):
    hashing.hash_experts(jnp.zeros((1, 3), jnp.int32), 4, kind='sha1')
  table = np.array([3, 1, 0, 2])
  path = str(tmp_path / 'table.npy')
  hashing.save_table(path, table)
  np.testing.assert_array_equal(np.asarray(hashing.load_table(path)), table)

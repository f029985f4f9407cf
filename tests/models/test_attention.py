"""Attention parts: T5 relative-position buckets against a transcription of T5's formula,
attention against a numpy softmax, masks against loops."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.models.attention import (Attention, RelativePositionBias, and_masks, causal_mask,
                                      padding_mask, relative_position_bucket, segment_mask)


def t5_bucket(relative_position, bidirectional, num_buckets, max_distance):
  """T5's `_relative_position_bucket` (Raffel et al. 2020; mesh-tf), scalar, float64."""
  ret, n = 0, -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += num_buckets if n < 0 else 0
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                        * (num_buckets - max_exact))
  return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize('bidirectional', [True, False])
@pytest.mark.parametrize('num_buckets, max_distance', [(32, 128), (8, 20), (64, 256), (32, 1000)])
def test_relative_position_buckets_match_t5(bidirectional, num_buckets, max_distance):
  rel = np.arange(-3000, 3001)
  got = np.asarray(relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                            num_buckets=num_buckets, max_distance=max_distance))
  want = np.array([t5_bucket(int(r), bidirectional, num_buckets, max_distance) for r in rel])
  np.testing.assert_array_equal(got, want)


def test_relative_position_buckets_known_values():
  # Encoder (32, 128): 8 exact distances per direction, keys after the query in 16..31.
  enc = lambda r: int(relative_position_bucket(jnp.asarray(r), bidirectional=True))
  assert [enc(0), enc(-1), enc(-7), enc(1), enc(7)] == [0, 1, 7, 17, 23]
  assert enc(-8) == 8 and enc(-127) == 15 and enc(-5000) == 15 and enc(5000) == 31
  # Decoder: 16 exact distances to earlier keys; later keys all in bucket 0.
  dec = lambda r: int(relative_position_bucket(jnp.asarray(r), bidirectional=False))
  assert [dec(0), dec(-15), dec(-16), dec(-5000), dec(3)] == [0, 15, 16, 31, 0]


def test_relative_position_bias_looks_up_its_table():
  rpb = RelativePositionBias(3, bidirectional=True, rngs=nnx.Rngs(0))
  q, k = jnp.array([[0, 1, 5]]), jnp.array([[0, 2, 3, 40]])
  bias = np.asarray(rpb(q, k))
  table = np.asarray(rpb.embedding[...])
  assert bias.shape == (1, 3, 3, 4)
  for i in range(3):
    for j in range(4):
      np.testing.assert_array_equal(bias[0, :, i, j],
                                    table[t5_bucket(int(k[0, j] - q[0, i]), True, 32, 128)])


def test_masks_match_loops():
  seg = np.array([[1, 1, 2, 2, 0], [1, 2, 2, 3, 3]])
  got = np.asarray(and_masks(causal_mask(5), segment_mask(jnp.asarray(seg), jnp.asarray(seg))))
  for b in range(2):
    for i in range(5):
      for j in range(5):
        want = j <= i and seg[b, i] == seg[b, j] and seg[b, i] > 0
        assert got[b, 0, i, j] == want
  np.testing.assert_array_equal(np.asarray(padding_mask(jnp.asarray(seg)))[:, 0, 0], seg > 0)
  assert and_masks(None, None) is None


def _np_attention(x, kv, wq, wk, wv, wo, heads, mask, bias):
  b, lq, _ = x.shape
  q, k, v = x @ wq, kv @ wk, kv @ wv
  split = lambda a: a.reshape(b, a.shape[1], heads, -1).transpose(0, 2, 1, 3)
  q, k, v = split(q), split(k), split(v)
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + bias
  logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  return (p @ v).transpose(0, 2, 1, 3).reshape(b, lq, -1) @ wo


def test_cross_attention_with_mask_and_bias_matches_numpy():
  rng = np.random.default_rng(0)
  attn = Attention(8, 2, head_dim=3, use_bias=False, kernel_init=nnx.initializers.normal(0.5),
                   rngs=nnx.Rngs(0))
  x, kv = rng.normal(size=(2, 4, 8)), rng.normal(size=(2, 5, 8))
  mask = rng.random((2, 1, 4, 5)) < 0.7
  mask[..., 0] = True                                   # every query sees one key
  bias = rng.normal(size=(1, 2, 4, 5))
  got = attn(jnp.asarray(x, jnp.float32), jnp.asarray(kv, jnp.float32), mask=jnp.asarray(mask),
             bias=jnp.asarray(bias, jnp.float32))
  w = lambda lin: np.asarray(lin.kernel[...], np.float64)
  want = _np_attention(x, kv, w(attn.query), w(attn.key), w(attn.value), w(attn.out), 2, mask, bias)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  assert attn.query.kernel.shape == (8, 6) and attn.out.kernel.shape == (6, 8)


def test_decode_step_equals_masked_self_attention():
  attn = Attention(8, 2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  full = attn(x, mask=causal_mask(5))
  z = jnp.zeros((2, 5, 2, 4))
  cache = {'k': z, 'v': z}
  for t in range(5):
    y, cache = attn.decode_step(x[:, t:t + 1], cache, jnp.asarray(t),
                                mask=(jnp.arange(5) <= t)[None, None, None])
    np.testing.assert_allclose(np.asarray(y[:, 0]), np.asarray(full[:, t]), atol=1e-6)

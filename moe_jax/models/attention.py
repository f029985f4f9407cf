"""Multi-head attention with masks, cross-attention and T5 relative position biases.

    mask = and_masks(causal_mask(L), segment_mask(segment_ids, segment_ids))   # [B, 1, L, L]
    bias = RelativePositionBias(heads, bidirectional=False, rngs=rngs)(pos, pos)  # [B, H, L, L]
    y = Attention(d, heads, rngs=rngs)(x, mask=mask, bias=bias)      # self-attention
    y = attn(x, encoded, mask=segment_mask(segment_ids, encoded_segment_ids))   # cross

Masks are boolean (True: may attend) and broadcast against the logits [B, H, Lq, Lk].
Segment ids [B, L] int: 0 = padding, 1, 2, ... = the packed document of each token; a
token attends only to real tokens of its own document, so packed documents never see
each other. A padding query attends to nothing (its row of probabilities is uniform and
its output is ignored downstream).

Logits are scaled by 1/sqrt(head_dim) (Vaswani et al.); T5 folds that factor into the
query initialisation instead, which is the same function under Adafactor but not under
Adam, so we keep the explicit scale for every model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.errors import check_positive

Array = jax.Array
# Masked logits are replaced (not shifted) by this, so a fully masked row stays finite.
MASKED = float(np.finfo(np.float32).min)


def causal_mask(length: int) -> Array:
  """[1, 1, L, L] bool: query t may attend to keys <= t (row order of the sequence)."""
  idx = jnp.arange(length)
  return (idx[None, :] <= idx[:, None])[None, None]


def segment_mask(q_segment_ids: Array, kv_segment_ids: Array) -> Array:
  """[B, 1, Lq, Lk] bool: same packed document and neither token is padding (segment 0)."""
  q, k = q_segment_ids[:, :, None], kv_segment_ids[:, None, :]
  return ((q == k) & (q > 0) & (k > 0))[:, None]


def padding_mask(kv_segment_ids: Array) -> Array:
  """[B, 1, 1, Lk] bool: keys that are real tokens (segment > 0)."""
  return (kv_segment_ids > 0)[:, None, None, :]


def and_masks(*masks: Array | None) -> Array | None:
  """Logical AND of the masks that are not None (None when all are)."""
  out = None
  for m in masks:
    if m is not None:
      out = m if out is None else out & m
  return out


def relative_position_bucket(relative_position: Array, *, bidirectional: bool,
                             num_buckets: int = 32, max_distance: int = 128) -> Array:
  """T5's bucket of each relative position (key position − query position).

  Distances below `max_exact = buckets // 2` get one bucket each; larger ones share
  log-spaced buckets up to `max_distance`, beyond which everything falls in the last
  bucket. Bidirectional (encoder): half of the buckets for keys before the query, half
  for keys after it. Unidirectional (decoder): keys after the query all map to bucket 0
  (they are masked anyway).

  Args:
    relative_position: int array, key position − query position.
    bidirectional, num_buckets, max_distance: T5 uses (True, 32, 128) in the encoder and
      (False, 32, 128) in the decoder.
  Returns:
    int32 array of the same shape, values in [0, num_buckets).
  """
  n = -relative_position.astype(jnp.int32)        # > 0: the key lies before the query
  if bidirectional:
    num_buckets //= 2
    offset = jnp.where(n < 0, num_buckets, 0)
    n = jnp.abs(n)
  else:
    offset = 0
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  # log(n / max_exact) / log(max_distance / max_exact) spreads [max_exact, max_distance)
  # over the remaining buckets; the epsilon keeps exact powers from rounding down in f32.
  ratio = jnp.maximum(n, max_exact).astype(jnp.float32) / max_exact
  scaled = (jnp.log(ratio + np.finfo(np.float32).eps) / np.log(max_distance / max_exact)
            * (num_buckets - max_exact))
  large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
  return (offset + jnp.where(n < max_exact, n, large)).astype(jnp.int32)


class RelativePositionBias(nnx.Module):
  """T5 relative position bias: one learned scalar per (bucket, head), added to the logits.

  T5 computes it once per stack and adds it in every layer (the stack owns one of these).
  Param: `embedding` [num_buckets, H] (variance-scaling fan_avg uniform, as T5X).
  """

  def __init__(self, num_heads: int, *, bidirectional: bool, num_buckets: int = 32,
               max_distance: int = 128, rngs: nnx.Rngs):
    self.bidirectional, self.num_buckets, self.max_distance = bidirectional, num_buckets, max_distance
    init = nnx.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')
    self.embedding = nnx.Param(init(rngs.params(), (num_buckets, num_heads), jnp.float32))

  def __call__(self, q_positions: Array, k_positions: Array) -> Array:
    """q_positions [B|1, Lq], k_positions [B|1, Lk] int -> bias [B|1, H, Lq, Lk] float32."""
    buckets = relative_position_bucket(k_positions[:, None, :] - q_positions[:, :, None],
                                       bidirectional=self.bidirectional,
                                       num_buckets=self.num_buckets, max_distance=self.max_distance)
    return jnp.moveaxis(jnp.take(self.embedding[...], buckets, axis=0), -1, 1)


class Attention(nnx.Module):
  """Multi-head dot-product attention: self-attention or cross-attention.

  Params: with `fused_qkv` (self-attention only; the ViT) one `qkv` Linear [d, 3·H·dh];
  otherwise `query` [d, H·dh], `key`, `value` [d_kv, H·dh]; and `out` [H·dh, d].

  Args:
    width: d, the width of the queries and of the output.
    num_heads: H.
    head_dim: dh (default d / H; T5 uses 64 whatever d).
    kv_width: width of the cross-attention inputs (default d).
    fused_qkv: one fused projection for q, k, v.
    use_bias: biases on the projections (ViT yes, T5 no).
    kernel_init: initialiser of every projection kernel.
    dtype: compute dtype (params stay float32).
  """

  def __init__(self, width: int, num_heads: int, *, head_dim: int | None = None,
               kv_width: int | None = None, fused_qkv: bool = False, use_bias: bool = True,
               kernel_init=None, dtype=None, rngs: nnx.Rngs):
    check_positive(width=width, num_heads=num_heads, head_dim=head_dim)
    if head_dim is None:
      if width % num_heads:
        raise ValueError(f'width {width} must be divisible by num_heads {num_heads}.')
      head_dim = width // num_heads
    self.num_heads, self.head_dim, self.fused_qkv = num_heads, head_dim, fused_qkv
    inner, kv_width = num_heads * head_dim, kv_width or width
    linear = lambda i, o: nnx.Linear(i, o, use_bias=use_bias, dtype=dtype, rngs=rngs,
                                     kernel_init=kernel_init or nnx.initializers.xavier_uniform())
    if fused_qkv:
      self.qkv = linear(width, 3 * inner)
    else:
      self.query, self.key, self.value = linear(width, inner), linear(kv_width, inner), linear(kv_width, inner)
    self.out = linear(inner, width)

  def _heads(self, y: Array) -> Array:
    return y.reshape(*y.shape[:2], self.num_heads, self.head_dim)

  def self_qkv(self, x: Array) -> tuple[Array, Array, Array]:
    """x [B, S, d] -> q, k, v, each [B, S, H, dh]."""
    if self.fused_qkv:
      qkv = self.qkv(x).reshape(*x.shape[:2], 3, self.num_heads, self.head_dim)
      return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    return self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))

  def query_heads(self, x: Array) -> Array:
    """x [B, S, d] -> q [B, S, H, dh] (cross-attention)."""
    return self._heads(self.query(x))

  def cross_kv(self, kv_input: Array) -> tuple[Array, Array]:
    """kv_input [B, Lk, d_kv] (e.g. the encoder output) -> k, v [B, Lk, H, dh]."""
    if self.fused_qkv:
      raise ValueError('an Attention with fused_qkv=True is self-attention only.')
    return self._heads(self.key(kv_input)), self._heads(self.value(kv_input))

  def attend(self, q: Array, k: Array, v: Array, *, mask: Array | None = None,
             bias: Array | None = None) -> Array:
    """q [B, Lq, H, dh], k, v [B, Lk, H, dh] -> [B, Lq, d]; softmax in float32."""
    b, lq = q.shape[:2]
    logits = jnp.einsum('bqhc,bkhc->bhqk', q, k) / np.sqrt(self.head_dim).astype(q.dtype)
    logits = logits.astype(jnp.float32)
    if bias is not None:
      logits = logits + bias
    if mask is not None:
      logits = jnp.where(mask, logits, MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    y = jnp.einsum('bhqk,bkhc->bqhc', probs, v.astype(q.dtype))
    return self.out(y.reshape(b, lq, self.num_heads * self.head_dim))

  def __call__(self, x: Array, kv_input: Array | None = None, *, mask: Array | None = None,
               bias: Array | None = None) -> Array:
    """x [B, Lq, d] (and kv_input [B, Lk, d_kv] for cross-attention) -> [B, Lq, d]."""
    if kv_input is None:
      q, k, v = self.self_qkv(x)
    else:
      q, (k, v) = self.query_heads(x), self.cross_kv(kv_input)
    return self.attend(q, k, v, mask=mask, bias=bias)

  def decode_step(self, x: Array, cache: dict, index: Array, *, mask: Array | None = None,
                  bias: Array | None = None) -> tuple[Array, dict]:
    """Self-attention of one new token against a key-value cache.

    Args:
      x: [B, 1, d], the token at position `index`.
      cache: {'k', 'v'}: [B, L, H, dh] keys and values of positions < index (and
        anything at later positions, which `mask` must hide).
      index: int32 scalar, the position of x.
      mask: [.., 1, L] bool over the cache positions (typically positions <= index).
      bias: [.., H, 1, L] relative position bias of this query.
    Returns:
      (y [B, 1, d], the cache with this token's key and value written at `index`).
    """
    q, k, v = self.self_qkv(x)
    k_all = jax.lax.dynamic_update_slice_in_dim(cache['k'], k.astype(cache['k'].dtype), index, 1)
    v_all = jax.lax.dynamic_update_slice_in_dim(cache['v'], v.astype(cache['v'].dtype), index, 1)
    return self.attend(q, k_all, v_all, mask=mask, bias=bias), {**cache, 'k': k_all, 'v': v_all}

"""Token ids for images, so that hash routers (`router='hash'`) can route ViT tokens.

Text models hash the input token id; an image has none, so we give every token one:

* `position_ids`: the token's position (class token first when there is one). With
  `kind='random'` this is the position hash; `kind='position'` needs no ids at all.
* `patch_content_ids`: a deterministic discrete id from each patch's pixels, a
  "vocabulary" of patch contents: brightness level × coarse structure.

      level = clip(floor((mean(patch) − lo) / (hi − lo) · levels), 0, levels − 1)
      code  = flat_code                          if std(patch) < flat_std · (hi − lo)
              Σ_b [ (patch − mean) · r_b > 0 ] 2^b   otherwise (SimHash, b < bits)
      id    = level · (2^bits + 1) + code        in [0, V − 1);  V − 1 is the class token

  r_b are fixed random ±1 directions drawn from `seed` (sign random projections,
  locality-sensitive: patches with similar structure share a code more often than
  unrelated ones). Identical patches
  always share an id, wherever they are. Route with `kind='random'` (a random function of
  the id) or `kind='balanced'` with a table from
  `routing.hashing.build_balanced_table(ids over the training set, content_vocab_size(...), E)`.

Both functions have the ViT's token-id signature
`fn(images [B, H, W, C], *, patch_size, num_tokens) -> [B, num_tokens] int32`, where
num_tokens = number of patches (+1 with a class token, which comes first).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import hashing

Array = jax.Array


def image_patches(images: Array, patch_size: int) -> Array:
  """images: [B, H, W, C] -> [B, N, patch_size² · C], patches in row-major order."""
  b, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f'image size {(h, w)} is not divisible by patch_size {p}.')
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def _with_class_token(ids: Array, num_tokens: int, cls_id: int) -> Array:
  b, n = ids.shape
  if num_tokens == n:
    return ids
  if num_tokens == n + 1:
    return jnp.concatenate([jnp.full((b, 1), cls_id, jnp.int32), ids], axis=1)
  raise ValueError(f'num_tokens={num_tokens} must be the number of patches ({n}) or one more '
                   f'(a class token).')


def position_ids(images: Array, *, patch_size: int, num_tokens: int) -> Array:
  """[B, num_tokens] int32: 0..num_tokens-1 (the class token, if any, is 0)."""
  del patch_size
  return jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (images.shape[0], num_tokens))


def content_vocab_size(levels: int = 4, bits: int = 4) -> int:
  """V of `patch_content_ids`: levels · (2^bits + 1) patch ids, plus the class token id."""
  return levels * (2 ** bits + 1) + 1


def content_projection(dim: int, bits: int = 4, seed: int = 0) -> Array:
  """[dim, bits] float32 random ±1 SimHash directions used by `patch_content_ids`.

  Drawn from the fixed integer hash `mix32`, not from `jax.random`, so ids never change
  with the JAX version or backend.
  """
  sign_bit = hashing.mix32(jnp.arange(dim * bits), seed) >> 31
  return (1.0 - 2.0 * sign_bit.astype(jnp.float32)).reshape(dim, bits)


def content_ids_from_patches(patches: Array, *, levels: int = 4, bits: int = 4,
                             value_range: tuple[float, float] = (0.0, 1.0),
                             flat_std: float = 0.02, seed: int = 0) -> Array:
  """patches: [B, N, D] pixel values -> [B, N] int32 ids in [0, V − 1) (see module doc)."""
  if levels < 1 or not 0 <= bits <= 24:
    raise ValueError(f'need levels >= 1 and 0 <= bits <= 24, got levels={levels}, bits={bits}.')
  lo, hi = value_range
  if not hi > lo:
    raise ValueError(f'value_range must be (low, high) with high > low, got {value_range}.')
  x = patches.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1)
  level = jnp.clip(jnp.floor((mean - lo) / (hi - lo) * levels), 0, levels - 1).astype(jnp.int32)
  z = x - mean[..., None]
  proj = jnp.einsum('bnd,dk->bnk', z, content_projection(x.shape[-1], bits, seed),
                    precision=jax.lax.Precision.HIGHEST)
  code = jnp.sum((proj > 0).astype(jnp.int32) << jnp.arange(bits, dtype=jnp.int32), axis=-1)
  flat = jnp.std(x, axis=-1) < flat_std * (hi - lo)
  code = jnp.where(flat, 2 ** bits, code)
  return level * (2 ** bits + 1) + code


def patch_content_ids(images: Array, *, patch_size: int, num_tokens: int, levels: int = 4,
                      bits: int = 4, value_range: tuple[float, float] = (0.0, 1.0),
                      flat_std: float = 0.02, seed: int = 0) -> Array:
  """[B, num_tokens] int32 patch-content ids (class token: content_vocab_size − 1).

  images: [B, H, W, C] with pixel values in `value_range` (values outside are clipped
  into the first / last brightness level).
  """
  ids = content_ids_from_patches(image_patches(images, patch_size), levels=levels, bits=bits,
                                 value_range=value_range, flat_std=flat_std, seed=seed)
  return _with_class_token(ids, num_tokens, content_vocab_size(levels, bits) - 1)


# name -> fn(images, *, patch_size, num_tokens) -> [B, S] int32 (the ViT's TOKEN_ID_FNS form).
TOKEN_ID_FNS = {'position': position_ids, 'patch_content': patch_content_ids}

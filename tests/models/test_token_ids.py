"""Token ids for images (position and patch-content hashes for the ViT)."""
import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from moe_jax.models import token_ids


def np_patches(images, p):
  b, h, w, c = images.shape
  out = np.zeros((b, (h // p) * (w // p), p * p * c))
  for i in range(h // p):
    for j in range(w // p):
      out[:, i * (w // p) + j] = images[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(b, -1)
  return out


def test_position_ids():
  ids = token_ids.position_ids(jnp.zeros((2, 8, 8, 1)), patch_size=4, num_tokens=5)
  np.testing.assert_array_equal(np.asarray(ids), np.tile(np.arange(5), (2, 1)))


def test_patch_content_ids_against_numpy():
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, size=(2, 8, 12, 3)).astype(np.float32)
  images[0, :4, :4] = 0.9                                   # a flat bright patch
  images[1, 4:, 8:] = images[0, :4, 4:8]                    # a copy of another patch
  levels, bits = 3, 4
  fn = jax.jit(functools.partial(token_ids.patch_content_ids, patch_size=4, num_tokens=7,
                                 levels=levels, bits=bits))
  ids = np.asarray(fn(jnp.asarray(images)))
  v = token_ids.content_vocab_size(levels, bits)
  assert ids.shape == (2, 7) and v == 3 * 17 + 1
  assert (ids[:, 0] == v - 1).all() and (ids[:, 1:] < v - 1).all() and (ids >= 0).all()
  # Reference: brightness level x SimHash code of the centred patch, flat patches apart.
  patches = np_patches(images.astype(np.float64), 4)
  r = np.asarray(token_ids.content_projection(48, bits), np.float64)
  mean = patches.mean(-1)
  level = np.clip(np.floor(mean * levels), 0, levels - 1)
  code = ((((patches - mean[..., None]) @ r) > 0) * (2 ** np.arange(bits))).sum(-1)
  code = np.where(patches.std(-1) < 0.02, 2 ** bits, code)
  np.testing.assert_array_equal(ids[:, 1:], level * (2 ** bits + 1) + code)
  assert ids[0, 1] == 2 * 17 + 16                            # flat, top brightness level
  assert ids[1, 6] == ids[0, 2]                              # identical patches, same id
  with pytest.raises(ValueError, match='num_tokens'):
    token_ids.patch_content_ids(jnp.asarray(images), patch_size=4, num_tokens=9)

"""Vision Transformer whose MLP blocks can be MoE layers (V-MoE, Soft MoE).

    model = ViT(num_classes=10, image_size=28, channels=1, **PRESETS['tiny'],
                moe=dict(router='soft_moe', num_experts=16, last_n=2), rngs=nnx.Rngs(0))
    logits, aux = model(images)       # images [B, H, W, C] -> logits [B, classes]
    aux['block_03']['losses']         # every MoE layer's aux losses and routing metrics

Pre-LayerNorm encoder (Dosovitskiy et al. 2021) with a patch embedding, learned or 2-d
sin-cos position embeddings, and a global-average-pool ('gap') or class-token ('token')
head. `moe` places MoE layers (any key of `layers.ROUTERS`) instead of the dense MLP in
the blocks chosen by `placement.moe_block_indices` (every k-th, last n, or explicit).
Built from `models.transformer` (pre-LN `Block`s with LayerNorm eps 1e-6, a fused qkv
projection, GELU MLPs with biases, xavier-uniform kernels, a zero-initialised head).

Every MoE layer gets `token_ids [B, S]` (hash routers need them), computed by a function
of `token_ids.TOKEN_ID_FNS`: the token's position (default; class token 0, patches
1..N) or a patch-content id (`token_ids.patch_content_ids`, a hash of the pixels).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.errors import check_positive
from moe_jax.layers import LayerContext
from moe_jax.models.placement import stack_moe_blocks
from moe_jax.models.token_ids import TOKEN_ID_FNS, image_patches
from moe_jax.models.transformer import (DTYPES, Block, compute_dtype, config_dict, make_mlp,
                                        moe_config)

Array = jax.Array

# Sizes: tiny/small for 28x28 images on a CPU; S/16..H/14 from ViT (Dosovitskiy et al. 2021).
PRESETS = {
    'tiny': dict(patch_size=4, width=64, depth=4, mlp_dim=128, num_heads=4),
    'small': dict(patch_size=4, width=128, depth=6, mlp_dim=256, num_heads=4),
    'S/16': dict(patch_size=16, width=384, depth=12, mlp_dim=1536, num_heads=6),
    'B/16': dict(patch_size=16, width=768, depth=12, mlp_dim=3072, num_heads=12),
    'L/16': dict(patch_size=16, width=1024, depth=24, mlp_dim=4096, num_heads=16),
    'H/14': dict(patch_size=14, width=1280, depth=32, mlp_dim=5120, num_heads=16),
}
# Soft MoE paper (Puigcerver et al. 2023) Table 1: 128 experts, 1 slot each, MoE in the
# last half of the blocks (S/14 uses 256 experts).
PAPER_MOE = {
    'S/16': dict(num_experts=128, last_n=6),
    'B/16': dict(num_experts=128, last_n=6),
    'L/16': dict(num_experts=128, last_n=12),
    'H/14': dict(num_experts=128, last_n=16),
}
# The ViT's dense MLP; MoE experts default to the same (GELU, no GLU, biases).
MLP_OPTIONS = dict(activation='gelu', glu=False, use_bias=True)


# images: [B, H, W, C] -> [B, N, patch_size² · C], row-major patches (the patch embedding's input).
extract_patches = image_patches


def sincos2d(h: int, w: int, width: int, temperature: float = 10_000.) -> np.ndarray:
  """2-d sin-cos position embedding (MoCo v3 / big_vision). -> [h·w, width]."""
  if width % 4:
    raise ValueError(f'sincos2d position embeddings need width % 4 == 0, got {width}.')
  y, x = np.mgrid[:h, :w]
  omega = 1. / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class ViT(nnx.Module):
  """ViT classifier with optional MoE MLP blocks.

  Args:
    num_classes: output classes.
    image_size: H (= W) or (H, W).
    channels: C.
    patch_size, width, depth, mlp_dim, num_heads: the backbone (see `PRESETS`).
    pool: 'gap' (mean of the final tokens) or 'token' (a class token).
    posemb: 'learn' or 'sincos2d'.
    moe: None (or router 'dense') for a dense ViT, or an MoE block: a dict / ConfigDict
      of `layers.MoeConfig` fields (`router` a `layers.ROUTERS` key, `num_experts`,
      `router_kwargs`, `expert_hidden` (default mlp_dim), `engine`, `group_size` (tokens
      per routing group; default one image), `glu`, `activation`, ..., and the placement
      `every` / `last_n` / `layers`, which is required), or a MoeConfig.
    token_ids: a key of `token_ids.TOKEN_ID_FNS` ('position', 'patch_content'), the
      function computing the ids handed to every MoE layer.
    token_ids_kwargs: extra keyword arguments of that function.
    patch_content: options of the 'patch_content' ids (`levels`, `bits`, `flat_std`,
      `seed`, and `value_range`, the pixel range of the images the model sees; the
      config must give the data pipeline's range); used only when
      token_ids='patch_content' (configs carry it whatever the token ids);
      `token_ids_kwargs` override it.
    size: the preset's name ('tiny', 'B/16', ...): an informational label, stored as
      `self.size`; the sizes themselves are the explicit keywords.
    dtype: compute dtype name ('float32', 'bfloat16'); params stay float32.
    rngs: `nnx.Rngs`.
  """

  def __init__(self, *, num_classes: int, image_size: int | tuple[int, int], channels: int,
               patch_size: int, width: int, depth: int, mlp_dim: int, num_heads: int,
               pool: str = 'gap', posemb: str = 'learn', moe=None,
               token_ids: str = 'position', token_ids_kwargs: dict | None = None,
               patch_content: dict | None = None, size: str | None = None,
               dtype: str = 'float32', rngs: nnx.Rngs):
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    check_positive(num_classes=num_classes, image_height=h, image_width=w, channels=channels,
                   patch_size=patch_size, depth=depth, mlp_dim=mlp_dim)   # heads: Attention
    if h % patch_size or w % patch_size:
      raise ValueError(f'image size {(h, w)} is not divisible by patch_size {patch_size}.')
    if pool not in ('gap', 'token'):
      raise ValueError(f"pool must be 'gap' or 'token', got {pool!r}.")
    if posemb not in ('learn', 'sincos2d'):
      raise ValueError(f"posemb must be 'learn' or 'sincos2d', got {posemb!r}.")
    if token_ids not in TOKEN_ID_FNS:
      raise ValueError(f'token_ids must be one of {sorted(TOKEN_ID_FNS)}, got {token_ids!r}.')
    cdt = compute_dtype(dtype)
    moe = moe_config(moe, field='config.model.moe', defaults=MLP_OPTIONS)
    self.size, self.patch_size, self.pool, self.token_ids_name = size, patch_size, pool, token_ids
    self.token_ids_kwargs = config_dict(token_ids_kwargs)
    if token_ids == 'patch_content':
      self.token_ids_kwargs = {**config_dict(patch_content), **self.token_ids_kwargs}
    bad = set(self.token_ids_kwargs) - set(inspect.signature(TOKEN_ID_FNS[token_ids]).parameters)
    if bad:
      raise ValueError(f'token_ids_kwargs {sorted(bad)} are not arguments of the {token_ids!r} '
                       f'token-id function.')
    if 'value_range' in self.token_ids_kwargs:
      self.token_ids_kwargs['value_range'] = tuple(self.token_ids_kwargs['value_range'])
    self.num_patches = (h // patch_size) * (w // patch_size)
    self.num_tokens = self.num_patches + (pool == 'token')
    self.embed = nnx.Linear(patch_size * patch_size * channels, width, dtype=cdt,
                            kernel_init=nnx.initializers.lecun_normal(), rngs=rngs)
    if posemb == 'learn':
      self.posemb = nnx.Param(0.02 * jax.random.normal(rngs.params(), (self.num_patches, width)))
    else:
      self.posemb = nnx.data(jnp.asarray(sincos2d(h // patch_size, w // patch_size, width)))
    self.cls = (nnx.Param(jnp.zeros((1, 1, width))) if pool == 'token' else nnx.data(None))
    self.moe_blocks = stack_moe_blocks(depth, moe, field='config.model.moe')
    context = LayerContext(tokens_per_group=(moe.group_size if moe and moe.group_size
                                             else self.num_tokens))
    blocks = []
    for i in range(depth):
      # The MLP is built before its block: the parameter draws keep the order of the
      # original ViT, so a seed gives the same initial weights as before the rebuild.
      mlp = make_mlp(width, mlp_dim, moe=moe if i in self.moe_blocks else None,
                     context=dataclasses.replace(context, name=f'block_{i:02d}'),
                     field='config.model.moe', dtype=cdt, rngs=rngs, **MLP_OPTIONS)
      blocks.append(Block(width, num_heads, mlp, norm='layernorm', norm_eps=1e-6, use_bias=True,
                          fused_qkv=True, dtype=cdt, rngs=rngs))
    self.blocks = nnx.List(blocks)
    self.norm = nnx.LayerNorm(width, epsilon=1e-6, dtype=cdt, rngs=rngs)
    self.head = nnx.Linear(width, num_classes, kernel_init=nnx.initializers.zeros_init(),
                           dtype=cdt, rngs=rngs)
    self.dtype = cdt

  def default_token_ids(self, images: Array) -> Array:
    """images: [B, H, W, C] -> [B, S] int32 via `TOKEN_ID_FNS[token_ids]`."""
    fn = functools.partial(TOKEN_ID_FNS[self.token_ids_name], **self.token_ids_kwargs)
    return fn(images, patch_size=self.patch_size, num_tokens=self.num_tokens)

  def __call__(self, images: Array, *, token_ids: Array | None = None) -> tuple[Array, dict]:
    """images: [B, H, W, C] -> (logits [B, classes] float32, aux {block name: aux})."""
    if token_ids is None:
      token_ids = self.default_token_ids(images)
    x = self.embed(extract_patches(images.astype(self.dtype), self.patch_size))
    x = x + jnp.asarray(self.posemb[...] if isinstance(self.posemb, nnx.Param) else self.posemb,
                        x.dtype)
    if self.pool == 'token':
      x = jnp.concatenate([jnp.broadcast_to(self.cls[...].astype(x.dtype), (x.shape[0], 1, x.shape[2])),
                           x], axis=1)
    aux = {}
    for i, block in enumerate(self.blocks):
      x, block_aux = block(x, token_ids)
      if block_aux is not None:
        aux[f'block_{i:02d}'] = block_aux
    x = self.norm(x)
    pooled = x[:, 0] if self.pool == 'token' else jnp.mean(x, axis=1)
    return self.head(pooled).astype(jnp.float32), aux


__all__ = ['DTYPES', 'MLP_OPTIONS', 'PAPER_MOE', 'PRESETS', 'ViT', 'extract_patches', 'sincos2d']

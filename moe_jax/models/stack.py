"""A stack of pre-norm blocks sharing one T5 relative position bias: a T5 encoder or decoder.

    stack = Stack(depth, width=d, num_heads=h, mlp_dim=f, name='decoder', causal=True,
                  cross_attention=True, moe=moe, rngs=rngs)
    x, aux = stack(x, token_ids, segment_ids=seg, encoded=enc, encoded_segment_ids=enc_seg)
    cache = stack.init_cache(B, L, encoded=enc)          # decoding, one token at a time
    x, cache = stack.decode_step(x_t, ids_t, cache)

Masks come from segment ids (packed documents never attend to each other; causal in a
decoder); MoE layers sit at `moe.placement()` and learn through their `LayerContext`
that they are in a decoder, so a router that reads later tokens is refused there.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers import LayerContext, MoeConfig
from moe_jax.models.attention import (RelativePositionBias, and_masks, causal_mask, padding_mask,
                                      segment_mask)
from moe_jax.models.placement import stack_moe_blocks
from moe_jax.models.transformer import Block, Mlp, make_mlp, make_norm, routes_tokens_alone

Array = jax.Array


class Stack(nnx.Module):
  """`depth` pre-norm blocks, a final norm and (optionally) one relative position bias
  shared by all blocks, as a T5 encoder or decoder.

  Args:
    depth: number of blocks.
    width, num_heads, mlp_dim, head_dim: block sizes.
    name: 'encoder' / 'decoder': prefix of the aux keys ('decoder/block_03') and of the
      MoE layers' context names.
    causal: decoder self-attention (and causal MoE layers).
    cross_attention: attend to an encoder's output.
    moe: MoE layers at `moe.placement()` (every k-th, last n or explicit blocks).
    moe_field: config path of `moe` for error messages ('config.model.decoder_moe').
    moe_extra_mlp: a dense MLP sublayer after every MoE sublayer (ST-MoE).
    tokens_per_group: the routing-group length MoE layers are told (default: the MoE
      config's group_size, else None: one sequence, length unknown at build time).
    activation, glu, use_bias: the dense MLPs (and the experts' defaults).
    norm, norm_eps: 'rmsnorm' (T5) or 'layernorm'.
    relative_bias: T5 relative position bias (bidirectional unless causal), with
      `num_buckets` and `max_distance`.
    kernel_init, dtype: as the blocks.
  """

  def __init__(self, depth: int, *, width: int, num_heads: int, mlp_dim: int, name: str,
               causal: bool = False, cross_attention: bool = False, moe: MoeConfig | None = None,
               moe_field: str = 'moe', moe_extra_mlp: bool = False, head_dim: int | None = None,
               tokens_per_group: int | None = None, activation: str = 'gelu', glu: bool = True,
               use_bias: bool = False, norm: str = 'rmsnorm', norm_eps: float = 1e-6,
               relative_bias: bool = True, num_buckets: int = 32, max_distance: int = 128,
               kernel_init=None, dtype=None, rngs: nnx.Rngs):
    self.name, self.causal, self.cross_attention = name, causal, cross_attention
    self.moe_blocks = stack_moe_blocks(depth, moe, field=moe_field)
    self.rel_bias = (RelativePositionBias(num_heads, bidirectional=not causal,
                                          num_buckets=num_buckets, max_distance=max_distance,
                                          rngs=rngs) if relative_bias else nnx.data(None))
    mlp_kw = dict(activation=activation, glu=glu, use_bias=use_bias, kernel_init=kernel_init,
                  dtype=dtype, rngs=rngs)
    blocks = []
    for i in range(depth):
      is_moe = i in self.moe_blocks
      context = LayerContext(tokens_per_group=(moe.group_size if moe and moe.group_size
                                               else tokens_per_group),
                             causal=causal, name=self.aux_name(i))
      mlp = make_mlp(width, mlp_dim, moe=moe if is_moe else None, context=context,
                     field=moe_field, **mlp_kw)
      extra = Mlp(width, mlp_dim, **mlp_kw) if is_moe and moe_extra_mlp else None
      blocks.append(Block(width, num_heads, mlp, head_dim=head_dim, cross_attention=cross_attention,
                          extra_mlp=extra, norm=norm, norm_eps=norm_eps, use_bias=use_bias,
                          kernel_init=kernel_init, dtype=dtype, rngs=rngs))
    self.blocks = nnx.List(blocks)
    self.norm = make_norm(norm, width, eps=norm_eps, dtype=dtype, rngs=rngs)

  def aux_name(self, i: int) -> str:
    return f'{self.name}/block_{i:02d}'

  def _bias(self, q_positions: Array, k_positions: Array) -> Array | None:
    return None if self.rel_bias is None else self.rel_bias(q_positions, k_positions)

  def __call__(self, x: Array, token_ids: Array | None = None, *,
               segment_ids: Array | None = None, positions: Array | None = None,
               encoded: Array | None = None,
               encoded_segment_ids: Array | None = None) -> tuple[Array, dict]:
    """x [B, L, d] -> (normed x [B, L, d], aux {'<name>/block_03': ...}).

    Args:
      token_ids: [B, L] int, handed to every MoE layer (hash routers).
      segment_ids: [B, L] int packed-document ids (0 = padding); None: one document.
      positions: [B, L] int positions for the relative bias (default 0..L-1; packed
        rows give the same bias either way, since documents never attend to each other).
      encoded, encoded_segment_ids: the encoder's output [B, Lk, d] and segment ids.
    """
    length = x.shape[1]
    mask = and_masks(causal_mask(length) if self.causal else None,
                     None if segment_ids is None else segment_mask(segment_ids, segment_ids))
    pos = jnp.arange(length)[None] if positions is None else positions
    bias = self._bias(pos, pos)
    cross_mask = None
    if encoded is not None and encoded_segment_ids is not None:
      cross_mask = (padding_mask(encoded_segment_ids) if segment_ids is None
                    else segment_mask(segment_ids, encoded_segment_ids))
    aux = {}
    for i, block in enumerate(self.blocks):
      x, block_aux = block(x, token_ids, mask=mask, bias=bias, encoded=encoded,
                           cross_mask=cross_mask)
      if block_aux is not None:
        aux[self.aux_name(i)] = block_aux
    return self.norm(x), aux

  def init_cache(self, batch_size: int, length: int, *, dtype=jnp.float32,
                 encoded: Array | None = None,
                 encoded_segment_ids: Array | None = None) -> dict:
    """An empty decoding cache for sequences of up to `length` tokens.

    With cross-attention the encoder's keys and values are computed here, once.
    Returns a pytree: {'index': int32 0, 'cross_mask', 'layers': [per-block dicts]}.
    """
    layers = []
    for block in self.blocks:
      a = block.attn
      kv = jnp.zeros((batch_size, length, a.num_heads, a.head_dim), dtype)
      c = {'k': kv, 'v': kv}
      if block.is_moe and not routes_tokens_alone(block.mlp):
        c['moe_x'] = jnp.zeros((batch_size, length, block.mlp.d_model), dtype)
        c['moe_ids'] = jnp.zeros((batch_size, length), jnp.int32)
      if self.cross_attention:
        c['cross_k'], c['cross_v'] = block.cross_attn.cross_kv(encoded)
      layers.append(c)
    cross_mask = (None if encoded_segment_ids is None or not self.cross_attention
                  else padding_mask(encoded_segment_ids))
    return {'index': jnp.zeros((), jnp.int32), 'cross_mask': cross_mask, 'layers': layers}

  def decode_step(self, x: Array, token_ids: Array | None, cache: dict) -> tuple[Array, dict]:
    """x [B, 1, d] (token_ids [B, 1]) at position cache['index'] -> (normed x, cache with
    the index advanced by one)."""
    index = cache['index']
    length = cache['layers'][0]['k'].shape[1]
    k_pos = jnp.arange(length)
    mask = (k_pos <= index)[None, None, None, :]
    bias = self._bias(index[None, None], k_pos[None])
    layers = []
    for block, c in zip(self.blocks, cache['layers']):
      x, c = block.decode_step(x, token_ids, c, index, mask=mask, bias=bias,
                               cross_mask=cache['cross_mask'])
      layers.append(c)
    return self.norm(x), {**cache, 'index': index + 1, 'layers': layers}

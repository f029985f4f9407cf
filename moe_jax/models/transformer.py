"""Shared transformer parts: the MLP, the MLP-or-MoE factory, the pre-norm block.

    moe = moe_config(config_dict, field='config.model.moe')      # MoeConfig | None
    mlp = make_mlp(d, hidden, moe=moe, context=LayerContext(tokens_per_group=S,
                   causal=True, name='decoder/block_03'), rngs=rngs)   # Mlp | MoeLayer
    block = Block(d, heads, mlp, cross_attention=True, norm='rmsnorm', rngs=rngs)
    x, aux = block(x, token_ids, mask=mask, bias=bias, encoded=enc, cross_mask=cmask)

`Mlp` keeps its kernels as `fc1`, `fc2` (and `fc_gate` with GLU) so that sparse upcycling
maps them onto an MoE layer's experts at the same module path (fc1 -> w_in, fc_gate ->
w_gate, fc2 -> w_out). Everything a router needs from the model reaches it through the
`LayerContext` the factory passes (group length, decoder or not, the layer's name) and
through the token ids the block hands to every MoE call (hash routers). Attention lives
in `models.attention`; a stack of blocks sharing one relative position bias (a T5
encoder or decoder) in `models.stack`.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.errors import ConfigError
from moe_jax.layers import LayerContext, MoeConfig, MoeLayer, SoftMoeRouter
from moe_jax.layers.experts import ACTIVATIONS
from moe_jax.models.attention import Attention

Array = jax.Array
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
NORMS = ('layernorm', 'rmsnorm')
# Hash kinds whose expert for token t reads other tokens of its group (t-1, or t's index).
_CONTEXT_HASH_KINDS = ('previous', 'bigram', 'position', 'next')


def compute_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f'dtype must be one of {sorted(DTYPES)}, got {name!r}.')
  return DTYPES[name]


def make_norm(kind: str, width: int, *, eps: float = 1e-6, dtype=None, rngs: nnx.Rngs) -> nnx.Module:
  """LayerNorm (ViT) or RMSNorm (T5: scale only, no mean subtraction)."""
  if kind == 'layernorm':
    return nnx.LayerNorm(width, epsilon=eps, dtype=dtype, rngs=rngs)
  if kind == 'rmsnorm':
    return nnx.RMSNorm(width, epsilon=eps, dtype=dtype, rngs=rngs)
  raise ValueError(f'norm must be one of {NORMS}, got {kind!r}.')


class Mlp(nnx.Module):
  """Dense MLP: fc2(act(fc1(x))), or with `glu` fc2(act(fc_gate(x)) * fc1(x)) (GEGLU /
  SwiGLU, Shazeer 2020, the gated branch as in `layers.Experts`). x: [B, S, d] -> [B, S, d]."""

  def __init__(self, width: int, hidden: int, *, activation: str = 'gelu', glu: bool = False,
               use_bias: bool = True, kernel_init=None, dtype=None, rngs: nnx.Rngs):
    if activation not in ACTIVATIONS:
      raise ValueError(f'activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}.')
    linear = lambda i, o: nnx.Linear(i, o, use_bias=use_bias, dtype=dtype, rngs=rngs,
                                     kernel_init=kernel_init or nnx.initializers.xavier_uniform())
    self.activation = activation
    self.fc1 = linear(width, hidden)
    self.fc_gate = linear(width, hidden) if glu else nnx.data(None)
    self.fc2 = linear(hidden, width)

  def __call__(self, x: Array) -> Array:
    act = ACTIVATIONS[self.activation]
    if self.fc_gate is None:
      return self.fc2(act(self.fc1(x)))
    return self.fc2(act(self.fc_gate(x)) * self.fc1(x))


def moe_config(moe: Mapping[str, Any] | MoeConfig | None, *, field: str,
               defaults: Mapping[str, Any] | None = None) -> MoeConfig | None:
  """A model's MoE option (dict, ConfigDict, MoeConfig or None) -> a validated MoeConfig.

  `defaults` fill the keys the dict leaves out or sets to None (a model passes its own
  MLP's `glu`, `activation`, `use_bias`, so experts match the dense MLPs unless
  configured otherwise).
  None (or router 'dense') -> None. Raises ConfigError naming `field.<key>`.
  """
  if moe is None or isinstance(moe, MoeConfig):
    return moe
  d = dict(moe.to_dict() if hasattr(moe, 'to_dict') else moe)
  if d and d.get('router', 'dense') != 'dense':
    defaults = dict(defaults or {})
    # An unset value (a ConfigDict placeholder, None) means "the model's default".
    d = {**defaults, **{k: v for k, v in d.items() if not (k in defaults and v is None)}}
  return MoeConfig.from_dict(d, field=field)


def make_mlp(width: int, hidden: int, *, moe: MoeConfig | None, context: LayerContext,
             activation: str = 'gelu', glu: bool = False, use_bias: bool = True,
             kernel_init=None, dtype=None, field: str = 'moe', rngs: nnx.Rngs) -> nnx.Module:
  """The block's feed-forward layer: a dense `Mlp`, or the `MoeLayer` that `moe` describes.

  Args:
    width, hidden: d and the dense MLP's hidden width (the experts' default).
    moe: None for a dense MLP.
    context: what the MoE layer (and its router) learns from the model; a causal
      context refuses routers that read later tokens unless `moe.allow_future_leak`.
    field: dotted name of the MoE option, prefixed to a ConfigError.
  """
  if moe is None:
    return Mlp(width, hidden, activation=activation, glu=glu, use_bias=use_bias,
               kernel_init=kernel_init, dtype=dtype, rngs=rngs)
  try:
    return MoeLayer.from_config(moe, width, default_hidden=hidden, context=context, dtype=dtype,
                                rngs=rngs)
  except ConfigError as e:
    raise e.under(field) from None


def routes_tokens_alone(layer: MoeLayer) -> bool:
  """Whether the layer may route a decode step's new token as a group of its own.

  True when the routing of token t reads x_t (and t's token id) only, apart from capacity:
  then routing [B, 1] at every step equals routing the whole sequence whenever nothing is
  dropped. False for routers that mix tokens (Soft MoE variants), hash kinds that read a
  neighbour or the position, non-causal layers and layers with cross-sequence groups; a
  router may declare it with a `token_local` attribute.
  """
  router = layer.router
  declared = getattr(router, 'token_local', None)
  if declared is not None:
    return bool(declared)
  if layer.group_size is not None or not layer.is_causal or isinstance(router, SoftMoeRouter):
    return False
  return getattr(router, 'kind', None) not in _CONTEXT_HASH_KINDS


class Block(nnx.Module):
  """Pre-norm transformer block; `mlp` is an `Mlp` or a `MoeLayer` (from `make_mlp`).

      x += attn(norm1(x))                          mask, bias: self-attention
      x += cross_attn(norm_cross(x), encoded)      with cross_attention
      x += mlp(norm2(x))                           MoE layers get token_ids
      x += mlp_extra(norm_extra(x))                with extra_mlp (ST-MoE's dense
                                                   MLP after every sparse one)
  """

  def __init__(self, width: int, num_heads: int, mlp: nnx.Module, *, head_dim: int | None = None,
               cross_attention: bool = False, extra_mlp: nnx.Module | None = None,
               norm: str = 'layernorm', norm_eps: float = 1e-6, use_bias: bool = True,
               fused_qkv: bool = False, kernel_init=None, dtype=None, rngs: nnx.Rngs):
    attention = lambda fused: Attention(width, num_heads, head_dim=head_dim, fused_qkv=fused,
                                        use_bias=use_bias, kernel_init=kernel_init, dtype=dtype,
                                        rngs=rngs)
    self.norm1 = make_norm(norm, width, eps=norm_eps, dtype=dtype, rngs=rngs)
    self.attn = attention(fused_qkv)
    if cross_attention:
      self.norm_cross = make_norm(norm, width, eps=norm_eps, dtype=dtype, rngs=rngs)
      self.cross_attn = attention(False)
    else:
      self.norm_cross = self.cross_attn = nnx.data(None)
    self.norm2 = make_norm(norm, width, eps=norm_eps, dtype=dtype, rngs=rngs)
    self.mlp = mlp
    self.is_moe = isinstance(mlp, MoeLayer)
    if extra_mlp is not None:
      self.norm_extra = make_norm(norm, width, eps=norm_eps, dtype=dtype, rngs=rngs)
      self.mlp_extra = extra_mlp
    else:
      self.norm_extra = self.mlp_extra = nnx.data(None)

  def _ffn(self, x: Array, token_ids: Array | None) -> tuple[Array, dict | None]:
    h = self.norm2(x)
    if self.is_moe:
      y, aux = self.mlp(h, token_ids=token_ids)
    else:
      y, aux = self.mlp(h), None
    x = x + y
    if self.mlp_extra is not None:
      x = x + self.mlp_extra(self.norm_extra(x))
    return x, aux

  def __call__(self, x: Array, token_ids: Array | None = None, *, mask: Array | None = None,
               bias: Array | None = None, encoded: Array | None = None,
               cross_mask: Array | None = None) -> tuple[Array, dict | None]:
    """x [B, L, d], token_ids [B, L] int (hash routers), encoded [B, Lk, d] (cross-
    attention) -> (x [B, L, d], the MoE layer's aux or None)."""
    x = x + self.attn(self.norm1(x), mask=mask, bias=bias)
    if self.cross_attn is not None:
      x = x + self.cross_attn(self.norm_cross(x), encoded, mask=cross_mask)
    return self._ffn(x, token_ids)

  def decode_step(self, x: Array, token_ids: Array | None, cache: dict, index: Array, *,
                  mask: Array | None = None, bias: Array | None = None,
                  cross_mask: Array | None = None) -> tuple[Array, dict]:
    """One new token: x [B, 1, d], token_ids [B, 1] at position `index` -> (x, cache).

    cache: 'k', 'v' (self-attention), 'cross_k', 'cross_v' (the encoder's keys and
    values, computed once), and for an MoE layer that cannot route a token alone
    (`routes_tokens_alone`) 'moe_x' [B, L, d] and 'moe_ids' [B, L]: the layer's inputs so
    far, routed again as a whole sequence at every step (its output at `index` depends on
    positions <= index only, since the layer is causal).
    """
    y, cache = self.attn.decode_step(self.norm1(x), cache, index, mask=mask, bias=bias)
    x = x + y
    if self.cross_attn is not None:
      q = self.cross_attn.query_heads(self.norm_cross(x))
      x = x + self.cross_attn.attend(q, cache['cross_k'], cache['cross_v'], mask=cross_mask)
    if 'moe_x' not in cache:
      x, _ = self._ffn(x, token_ids)
      return x, cache
    h = self.norm2(x)
    buf = jax.lax.dynamic_update_slice_in_dim(cache['moe_x'], h.astype(cache['moe_x'].dtype), index, 1)
    ids = cache['moe_ids']
    if token_ids is not None:
      ids = jax.lax.dynamic_update_slice_in_dim(ids, token_ids.astype(ids.dtype), index, 1)
    y, _ = self.mlp(buf, token_ids=ids)
    x = x + jax.lax.dynamic_slice_in_dim(y, index, 1, 1).astype(x.dtype)
    if self.mlp_extra is not None:
      x = x + self.mlp_extra(self.norm_extra(x))
    return x, {**cache, 'moe_x': buf, 'moe_ids': ids}


def config_dict(obj: Any) -> dict:
  """ConfigDict / Mapping / None -> a plain dict (models accept either from configs)."""
  if obj is None:
    return {}
  return dict(obj.to_dict() if hasattr(obj, 'to_dict') else obj)


__all__ = ['Block', 'DTYPES', 'Mlp', 'compute_dtype', 'config_dict', 'make_mlp',
           'make_norm', 'moe_config', 'routes_tokens_alone']

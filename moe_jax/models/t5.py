"""T5.1.1-style encoder-decoder and decoder-only language models with per-stack MoE.

    model = EncoderDecoder(vocab_size=4096, **PRESETS['tiny'], rngs=nnx.Rngs(0),
                           encoder_moe=dict(router='switch', num_experts=8, every=2),
                           decoder_moe=dict(router='switch', num_experts=8, every=2))
    logits, aux = model(inputs, decoder_inputs, input_segment_ids=..., target_segment_ids=...)
    lm = Decoder(vocab_size=4096, **DECODER_PRESETS['tiny'], rngs=nnx.Rngs(0),
                 moe=dict(router='hash', num_experts=8, layers=(2,)))
    logits, aux = lm(tokens, segment_ids=..., positions=...)    # logits [B, L, V] float32
    aux['decoder/block_03']['losses']      # every MoE layer's aux losses and routing metrics

Architecture (T5.1.1, Raffel et al. 2020 + the t5.1.1 checkpoints): pre-norm blocks with
RMSNorm (scale only, eps 1e-6), a T5 relative position bias per stack (32 buckets, max
distance 128; bidirectional in the encoder, unidirectional in the decoder) shared by its
blocks, GEGLU MLPs, no biases anywhere, token embeddings N(0, 1) shared by encoder and
decoder, an untied output layer (`tie_embeddings=True` reuses the embedding, scaled by
d^-1/2 as T5 1.0 does). Attention logits carry the explicit 1/sqrt(head_dim).

MoE: `encoder_moe` / `decoder_moe` (Decoder: `moe`) are `layers.MoeConfig` dicts; their
placement puts MoE layers at every k-th block (`every=2`: Switch; `every=4`: T5X/ST-MoE
"every fourth") or `last_n` / explicit `layers`. Experts default to the model's own MLP
(GEGLU without biases) unless the dict says otherwise. Routing groups are one sequence
each (the T5X gins route groups of 4096-8192 tokens across sequences; `group_size` does
that, and a decoder refuses it, since such groups let a token see other positions).
Decoder MoE layers must be causal: a router that reads later tokens raises a ConfigError
naming the causal routers, unless the MoE dict sets `allow_future_leak=True`. Hash
routers route on the real token ids: the encoder's `inputs`, the decoder's input ids.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.errors import check_positive
from moe_jax.models.stack import Stack
from moe_jax.models.transformer import compute_dtype, moe_config

Array = jax.Array

_T5_BASE_DIMS = dict(vocab_size=32128, width=768, num_heads=12, head_dim=64, encoder_depth=12,
                     decoder_depth=12)
# flaxformer's capacity convention (C = max(round(cf·S/E), 4), k not counted), cf 1.25/2.0.
_T5X_CAPACITY = dict(capacity_factor=1.25, eval_capacity_factor=2.0, capacity_include_k=False,
                     capacity_rounding='round', min_capacity=4)
_TOP2 = dict(router='tokens_choice', every=4, router_kwargs=dict(k=2, **_T5X_CAPACITY))
_SWITCH_BASE_MOE = dict(router='switch', num_experts=128, every=2, activation='relu', glu=False,
                        use_bias=False)
_ST_MOE_BASE_MOE = dict(_TOP2, num_experts=16,
                        router_kwargs=dict(k=2, z_loss_weight=1e-4, **_T5X_CAPACITY))

# EncoderDecoder(**PRESETS[name], rngs=...); where vocab_size is absent it comes from the
# tokenizer. Sources: t5x/examples/t5/t5_1_1/{small,base}.gin; flaxformer
# t5x/configs/moe/models/{switch_base,tokens_choose_base,st_moe_base}.gin; Switch paper
# (Fedus et al. 2022) Table 9 (Switch-Base: 128 experts, every other FFN).
PRESETS = {
    # CPU sizes (notes/lm-experiments.md §6).
    'tiny': dict(width=128, num_heads=4, head_dim=32, mlp_dim=512, encoder_depth=2,
                 decoder_depth=2),
    'small': dict(width=256, num_heads=4, head_dim=64, mlp_dim=1024, encoder_depth=4,
                  decoder_depth=4),
    # T5.1.1 (~77M and ~250M parameters per the t5 repo's released_checkpoints.md).
    't5_1_1_small': dict(vocab_size=32128, width=512, num_heads=6, head_dim=64, mlp_dim=1024,
                         encoder_depth=8, decoder_depth=8),
    't5_1_1_base': dict(_T5_BASE_DIMS, mlp_dim=2048),
    # T5 1.0 Base (ReLU, d_ff 3072, tied embeddings): the Switch paper's 223M dense baseline.
    't5_base': dict(_T5_BASE_DIMS, mlp_dim=3072, activation='relu', glu=False,
                    tie_embeddings=True),
    # Switch-Base, 128 experts top-1 every other FFN on T5-Base (7.4B, Switch paper).
    'switch_base_128': dict(_T5_BASE_DIMS, mlp_dim=3072, activation='relu', glu=False,
                            tie_embeddings=True, encoder_moe=_SWITCH_BASE_MOE,
                            decoder_moe=_SWITCH_BASE_MOE),
    # T5X top-2, 64 experts every fourth FFN on T5.1.1-Base; batch-prioritised routing in
    # the encoder only (it reads later tokens, so never in the decoder).
    'tokens_choose_base': dict(
        _T5_BASE_DIMS, mlp_dim=2048,
        encoder_moe=dict(_TOP2, num_experts=64,
                         router_kwargs=dict(_TOP2['router_kwargs'], batch_priority=True)),
        decoder_moe=dict(_TOP2, num_experts=64)),
    # ST-MoE-Base (T5X): 16 experts top-2 every fourth FFN, router z-loss 1e-4, and a
    # dense MLP sublayer after every sparse one.
    'st_moe_base': dict(_T5_BASE_DIMS, mlp_dim=2048, encoder_moe=_ST_MOE_BASE_MOE,
                        decoder_moe=_ST_MOE_BASE_MOE, moe_extra_mlp=True),
}
# Decoder(**DECODER_PRESETS[name], vocab_size=..., rngs=...): CPU sizes.
DECODER_PRESETS = {
    'tiny': dict(width=128, depth=4, num_heads=4, head_dim=32, mlp_dim=512),
    'small': dict(width=256, depth=6, num_heads=4, head_dim=64, mlp_dim=1024),
}


# Constructor keywords both models share; their __init__ forwards them to `_setup`.
_SHARED = ('vocab_size', 'width', 'num_heads', 'head_dim', 'mlp_dim', 'activation', 'glu',
           'tie_embeddings', 'num_buckets', 'max_distance', 'norm_eps', 'moe_extra_mlp', 'dtype',
           'size', 'rngs')


def _kernel_init():
  return nnx.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')


class _LanguageModel(nnx.Module):
  """Token embedding and output logits shared by both models."""

  def _logits(self, x: Array) -> Array:
    """x [..., d] -> float32 logits [..., V] (computed in float32 for stability)."""
    x = x.astype(jnp.float32)
    if self.head is not None:
      return self.head(x)
    return jnp.einsum('...d,vd->...v', x, self.embed.embedding[...]) / np.sqrt(self.width)

  def _setup(self, *, vocab_size: int, width: int, num_heads: int, head_dim: int | None,
             mlp_dim: int, activation: str, glu: bool, tie_embeddings: bool, num_buckets: int,
             max_distance: int, norm_eps: float, moe_extra_mlp: bool, dtype: str,
             size: str | None, rngs: nnx.Rngs) -> dict:
    """Builds the embedding and output layer; returns the keywords of the model's stacks."""
    check_positive(vocab_size=vocab_size, width=width, num_heads=num_heads, head_dim=head_dim,
                   mlp_dim=mlp_dim, num_buckets=num_buckets, max_distance=max_distance)
    self.size, self.vocab_size, self.width = size, vocab_size, width
    self.dtype = compute_dtype(dtype)
    # Experts default to the model's own MLP unless the MoE dict says otherwise.
    self.expert_defaults = dict(activation=activation, glu=glu, use_bias=False)
    self.embed = nnx.Embed(vocab_size, width, embedding_init=nnx.initializers.normal(1.0),
                           dtype=self.dtype, rngs=rngs)
    self.head = (nnx.data(None) if tie_embeddings else
                 nnx.Linear(width, vocab_size, use_bias=False, kernel_init=_kernel_init(),
                            dtype=jnp.float32, rngs=rngs))
    return dict(width=width, num_heads=num_heads, head_dim=head_dim, mlp_dim=mlp_dim,
                activation=activation, glu=glu, use_bias=False, norm='rmsnorm', norm_eps=norm_eps,
                relative_bias=True, num_buckets=num_buckets, max_distance=max_distance,
                moe_extra_mlp=moe_extra_mlp, kernel_init=_kernel_init(), dtype=self.dtype,
                rngs=rngs)


class EncoderDecoder(_LanguageModel):
  """T5.1.1-style encoder-decoder (span corruption).

  Args:
    vocab_size: V (shared input and output vocabulary).
    width, num_heads, head_dim, mlp_dim: d, H, dh (default d/H), the MLP hidden width.
    encoder_depth, decoder_depth: blocks per stack.
    activation, glu: the MLP ('gelu' + glu = GEGLU, T5.1.1; 'relu' without glu, T5 1.0).
    tie_embeddings: compute the logits with the input embedding (T5.1.1: False).
    num_buckets, max_distance: relative position buckets (T5: 32, 128).
    norm_eps: RMSNorm epsilon.
    encoder_moe, decoder_moe: MoE blocks of each stack (dict / ConfigDict of
      `layers.MoeConfig` fields, MoeConfig, or None / router 'dense').
    moe_extra_mlp: ST-MoE's dense MLP sublayer after every MoE sublayer.
    max_input_length, max_target_length: the sequence lengths the MoE layers are told as
      their routing-group length (Soft MoE with a capacity factor needs it); the model
      itself takes any length.
    dtype: compute dtype name ('float32', 'bfloat16'); params and logits stay float32.
    size: the preset's name, an informational label (`self.size`).
  """

  def __init__(self, *, vocab_size: int, width: int, num_heads: int, mlp_dim: int,
               encoder_depth: int, decoder_depth: int, head_dim: int | None = None,
               activation: str = 'gelu', glu: bool = True, tie_embeddings: bool = False,
               num_buckets: int = 32, max_distance: int = 128, norm_eps: float = 1e-6,
               encoder_moe=None, decoder_moe=None, moe_extra_mlp: bool = False,
               max_input_length: int | None = None, max_target_length: int | None = None,
               dtype: str = 'float32', size: str | None = None, rngs: nnx.Rngs):
    check_positive(encoder_depth=encoder_depth, decoder_depth=decoder_depth)
    kw = self._setup(**{k: v for k, v in locals().items() if k in _SHARED})
    enc_moe = moe_config(encoder_moe, field='config.model.encoder_moe',
                         defaults=self.expert_defaults)
    dec_moe = moe_config(decoder_moe, field='config.model.decoder_moe',
                         defaults=self.expert_defaults)
    self.encoder = Stack(encoder_depth, name='encoder', causal=False, moe=enc_moe,
                         moe_field='config.model.encoder_moe', tokens_per_group=max_input_length,
                         **kw)
    self.decoder = Stack(decoder_depth, name='decoder', causal=True, cross_attention=True,
                         moe=dec_moe, moe_field='config.model.decoder_moe',
                         tokens_per_group=max_target_length, **kw)

  def encode(self, inputs: Array, *, segment_ids: Array | None = None,
             positions: Array | None = None) -> tuple[Array, dict]:
    """inputs [B, Li] int -> (encoded [B, Li, d], encoder aux)."""
    x = self.embed(inputs)
    return self.encoder(x, inputs, segment_ids=segment_ids, positions=positions)

  def decode(self, encoded: Array, decoder_inputs: Array, *, input_segment_ids: Array | None = None,
             target_segment_ids: Array | None = None,
             target_positions: Array | None = None) -> tuple[Array, dict]:
    """encoded [B, Li, d], decoder_inputs [B, Lt] int -> (logits [B, Lt, V] f32, decoder aux)."""
    y, aux = self.decoder(self.embed(decoder_inputs), decoder_inputs,
                          segment_ids=target_segment_ids, positions=target_positions,
                          encoded=encoded, encoded_segment_ids=input_segment_ids)
    return self._logits(y), aux

  def __call__(self, inputs: Array, decoder_inputs: Array, *, input_segment_ids: Array | None = None,
               input_positions: Array | None = None, target_segment_ids: Array | None = None,
               target_positions: Array | None = None) -> tuple[Array, dict]:
    """Teacher-forced logits.

    Args:
      inputs: [B, Li] int encoder token ids.
      decoder_inputs: [B, Lt] int decoder input ids (targets shifted right, 0 = start).
      input_segment_ids, target_segment_ids: [B, Li], [B, Lt] packed-document ids
        (0 = padding; a target token attends to the inputs of its own document only).
      input_positions, target_positions: [B, Li], [B, Lt] positions within documents.
    Returns:
      (logits [B, Lt, V] float32, aux {'encoder/block_01': ..., 'decoder/block_03': ...}).
    """
    encoded, aux = self.encode(inputs, segment_ids=input_segment_ids, positions=input_positions)
    logits, dec_aux = self.decode(encoded, decoder_inputs, input_segment_ids=input_segment_ids,
                                  target_segment_ids=target_segment_ids,
                                  target_positions=target_positions)
    return logits, {**aux, **dec_aux}

  def init_cache(self, inputs: Array, max_length: int, *, input_segment_ids: Array | None = None,
                 input_positions: Array | None = None) -> dict:
    """Runs the encoder once and returns a decoding cache for up to `max_length` targets."""
    encoded, _ = self.encode(inputs, segment_ids=input_segment_ids, positions=input_positions)
    return self.decoder.init_cache(inputs.shape[0], max_length, dtype=self.dtype, encoded=encoded,
                                   encoded_segment_ids=input_segment_ids)

  def decode_step(self, token: Array, cache: dict) -> tuple[Array, dict]:
    """token [B] int (decoder input at position cache['index']) -> (logits [B, V], cache)."""
    ids = token[:, None]
    y, cache = self.decoder.decode_step(self.embed(ids), ids, cache)
    return self._logits(y[:, 0]), cache


class Decoder(_LanguageModel):
  """Decoder-only language model (causal LM) with the T5.1.1 block.

  Args: as `EncoderDecoder`, with `depth` blocks, `moe` for the one stack and
  `max_length` (the routing-group length MoE layers are told).
  """

  def __init__(self, *, vocab_size: int, width: int, depth: int, num_heads: int, mlp_dim: int,
               head_dim: int | None = None, activation: str = 'gelu', glu: bool = True,
               tie_embeddings: bool = False, num_buckets: int = 32, max_distance: int = 128,
               norm_eps: float = 1e-6, moe=None, moe_extra_mlp: bool = False,
               max_length: int | None = None, dtype: str = 'float32', size: str | None = None,
               rngs: nnx.Rngs):
    check_positive(depth=depth)
    kw = self._setup(**{k: v for k, v in locals().items() if k in _SHARED})
    dec_moe = moe_config(moe, field='config.model.moe', defaults=self.expert_defaults)
    self.decoder = Stack(depth, name='decoder', causal=True, moe=dec_moe,
                         moe_field='config.model.moe', tokens_per_group=max_length, **kw)

  def __call__(self, tokens: Array, *, segment_ids: Array | None = None,
               positions: Array | None = None) -> tuple[Array, dict]:
    """tokens [B, L] int (segment_ids, positions [B, L]) -> (logits [B, L, V] f32, aux)."""
    y, aux = self.decoder(self.embed(tokens), tokens, segment_ids=segment_ids,
                          positions=positions)
    return self._logits(y), aux

  def init_cache(self, batch_size: int, max_length: int) -> dict:
    """An empty decoding cache for `batch_size` sequences of up to `max_length` tokens."""
    return self.decoder.init_cache(batch_size, max_length, dtype=self.dtype)

  def decode_step(self, token: Array, cache: dict) -> tuple[Array, dict]:
    """token [B] int at position cache['index'] -> (logits [B, V] float32 of the next
    token, cache)."""
    ids = token[:, None]
    y, cache = self.decoder.decode_step(self.embed(ids), ids, cache)
    return self._logits(y[:, 0]), cache

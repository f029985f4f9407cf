"""Autoregressive decoding with a key-value cache: greedy and temperature sampling.

    tokens = decoding.generate(lm, prompt, max_new_tokens=32)              # [B, P + 32], greedy
    tokens = decoding.generate(lm, prompt, max_new_tokens=32, temperature=0.8,
                               rng=jax.random.key(0), top_k=40)
    out = decoding.generate(t5, inputs, max_new_tokens=29, input_segment_ids=seg)  # [B, 29]
    logits = decoding.incremental_logits(lm, tokens)      # [B, L, V], one token at a time

`lm` is a `t5.Decoder`, `t5` a `t5.EncoderDecoder` (its encoder runs once; the decoder
starts from `start_id`, 0 as in T5). Decoding runs the model in evaluation mode (no
router noise or sampling, evaluation capacity factors) inside one `jax.jit`: one
`lax.scan` step per token, each step feeding one token to every layer against the
cached keys and values of the earlier positions.

MoE layers route one new token at a time: a group of one token per sequence, so no
sequence depends on the others in the batch. That equals routing the whole sequence
(the teacher-forced pass) for every causal router whose choice for a token reads that
token only, as long as the teacher-forced pass drops nothing (a group of one token
always fits: capacity >= 1 per expert). Routers that mix tokens (causal Soft MoE) or
hash a neighbour or the position keep the layer's inputs in the cache and re-route the
prefix at every step (`transformer.routes_tokens_alone`), which costs a full-sequence
MoE call per token but is exact for every causal router, capacity included.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def _choose(logits: Array, key: Array | None, *, temperature: float, top_k: int | None) -> Array:
  """logits [B, V] -> token [B] int32: argmax at temperature 0, else a sample."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(nnx.jit, static_argnames=('num_steps', 'temperature', 'top_k', 'eos_id',
                                             'pad_id'))
def _decode(model, prompt: Array, inputs: Array | None, input_segment_ids: Array | None,
            rng: Array | None, *, num_steps: int, temperature: float, top_k: int | None,
            eos_id: int | None, pad_id: int):
  """Feeds `num_steps` tokens: prompt[:, t] while t < P, then the token chosen at t - 1.

  Returns (chosen [B, num_steps] int32: the token chosen after each step; logits
  [B, num_steps, V] float32: the next-token logits of each step).
  """
  batch, prompt_len = prompt.shape
  if inputs is None:
    cache = model.init_cache(batch, num_steps)
  else:
    cache = model.init_cache(inputs, num_steps, input_segment_ids=input_segment_ids)

  def step(carry, t):
    cache, prev, done = carry
    token = jnp.where(t < prompt_len, prompt[:, jnp.minimum(t, prompt_len - 1)], prev)
    logits, cache = model.decode_step(token, cache)
    key = None if rng is None else jax.random.fold_in(rng, t)
    chosen = _choose(logits, key, temperature=temperature, top_k=top_k)
    # Generated positions after an end-of-sequence token are padding.
    generated = t >= prompt_len - 1
    chosen = jnp.where(done, pad_id, chosen)
    if eos_id is not None:
      done = done | (generated & (chosen == eos_id))
    return (cache, chosen, done), (chosen, logits)

  init = (cache, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool))
  _, (chosen, logits) = jax.lax.scan(step, init, jnp.arange(num_steps))
  return jnp.moveaxis(chosen, 0, 1), jnp.moveaxis(logits, 0, 1)


def _run(model, prompt, *, num_steps, inputs=None, input_segment_ids=None, temperature=0.0,
         top_k=None, rng=None, eos_id=None, pad_id=0):
  if temperature < 0:
    raise ValueError(f'temperature must be >= 0, got {temperature}.')
  if temperature > 0 and rng is None:
    raise ValueError('sampling (temperature > 0) needs rng=jax.random.key(...).')
  # A copy in evaluation mode (no router noise, evaluation capacity); arrays are shared.
  model = nnx.clone(model)
  model.eval()
  return _decode(model, jnp.asarray(prompt, jnp.int32),
                 None if inputs is None else jnp.asarray(inputs, jnp.int32),
                 None if input_segment_ids is None else jnp.asarray(input_segment_ids, jnp.int32),
                 rng, num_steps=num_steps, temperature=float(temperature), top_k=top_k,
                 eos_id=eos_id, pad_id=pad_id)


def _is_seq2seq(model) -> bool:
  return hasattr(model, 'encoder')


def generate(model, prompt_or_inputs: Array, *, max_new_tokens: int, temperature: float = 0.0,
             rng: Array | None = None, top_k: int | None = None, eos_id: int | None = None,
             input_segment_ids: Array | None = None, start_id: int = 0, pad_id: int = 0) -> Array:
  """Greedy (temperature 0) or sampled continuation.

  Args:
    model: a `t5.Decoder` or a `t5.EncoderDecoder`.
    prompt_or_inputs: Decoder: the prompt [B, P] int (same length for every row);
      EncoderDecoder: the encoder inputs [B, Li] int.
    max_new_tokens: N, tokens to generate.
    temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature).
    rng: a `jax.random.key`, needed when sampling (step t uses fold_in(rng, t)).
    top_k: sample among the k most likely tokens only.
    eos_id: once a row produces it, the row's later tokens are `pad_id`.
    input_segment_ids: EncoderDecoder only: [B, Li] (0 = padding of the inputs).
    start_id: EncoderDecoder only: the first decoder input (T5: 0).
  Returns:
    Decoder: [B, P + N] (the prompt, then the new tokens); EncoderDecoder: [B, N].
  """
  kw = dict(temperature=temperature, top_k=top_k, rng=rng, eos_id=eos_id, pad_id=pad_id)
  if _is_seq2seq(model):
    start = jnp.full((prompt_or_inputs.shape[0], 1), start_id, jnp.int32)
    chosen, _ = _run(model, start, num_steps=max_new_tokens, inputs=prompt_or_inputs,
                     input_segment_ids=input_segment_ids, **kw)
    return chosen
  prompt = jnp.asarray(prompt_or_inputs, jnp.int32)
  chosen, _ = _run(model, prompt, num_steps=prompt.shape[1] + max_new_tokens - 1, **kw)
  return jnp.concatenate([prompt, chosen[:, prompt.shape[1] - 1:]], axis=1)


def incremental_logits(model, tokens: Array, *, inputs: Array | None = None,
                       input_segment_ids: Array | None = None) -> Array:
  """Next-token logits of every position computed one token at a time through the cache.

  Args:
    model: a `t5.Decoder` (tokens = its inputs) or a `t5.EncoderDecoder` (tokens = the
      decoder inputs, `inputs` = the encoder inputs).
    tokens: [B, L] int.
  Returns:
    [B, L, V] float32; equals the teacher-forced `model(...)` logits (in eval mode) when
    the MoE layers drop nothing (see the module docstring).
  """
  if _is_seq2seq(model) != (inputs is not None):
    raise ValueError('pass inputs= for an EncoderDecoder (and only for it).')
  _, logits = _run(model, tokens, num_steps=tokens.shape[1], inputs=inputs,
                   input_segment_ids=input_segment_ids)
  return logits

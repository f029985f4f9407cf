"""Decoding with a key-value cache: incremental logits equal teacher-forced logits for every
causal router when nothing is dropped; greedy and sampled generation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.layers import ROUTERS
from moe_jax.models import Decoder, EncoderDecoder, decoding
from moe_jax.models.transformer import routes_tokens_alone

V = 48
TINY = dict(vocab_size=V, width=16, num_heads=2, mlp_dim=32)
SMALL_E_KWARGS = {'deepseek': dict(k=2), 'noisy_top_k': dict(k=2), 'dselect_k': dict(k=2),
                  'tokens_choice': dict(k=2)}
# Every causal router, and the hash kinds that read a neighbour or the position.
CASES = ([(r, SMALL_E_KWARGS.get(r, {})) for r in sorted(n for n, c in ROUTERS.items() if c.causal)]
         + [('hash', dict(kind=kind)) for kind in ('previous', 'bigram', 'position')])


@nnx.jit
def _teacher_forced(model, tokens):
  return model(tokens)[0]


@nnx.jit
def _teacher_forced_aux(model, tokens):
  return model(tokens)[1]


@nnx.jit
def _seq2seq_teacher_forced(model, inputs, dec, input_segment_ids):
  return model(inputs, dec, input_segment_ids=input_segment_ids)[0]


def _lm(router, kwargs, engine='dropless', **extra):
  """Two blocks, the second MoE: the MoE input depends on attention over the prefix."""
  cfg = dict(router=router, num_experts=4, layers=(1,), engine=engine, router_kwargs=kwargs, **extra)
  return Decoder(**TINY, depth=2, moe=cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('router, kwargs', CASES, ids=[f'{r}-{k}' for r, k in CASES])
def test_incremental_logits_equal_teacher_forced_for_every_causal_router(router, kwargs):
  model = _lm(router, kwargs)
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, V)
  got = decoding.incremental_logits(model, tokens)
  model.eval()
  np.testing.assert_allclose(np.asarray(got), np.asarray(_teacher_forced(model, tokens)),
                             atol=1e-5, rtol=1e-5)


def test_token_local_routers_route_one_token_per_step_others_reroute_the_prefix():
  assert routes_tokens_alone(_lm('switch', {}).decoder.blocks[1].mlp)
  assert routes_tokens_alone(_lm('hash', dict(kind='random')).decoder.blocks[1].mlp)
  assert not routes_tokens_alone(_lm('soft_moe_causal', {}).decoder.blocks[1].mlp)
  assert not routes_tokens_alone(_lm('hash', dict(kind='previous')).decoder.blocks[1].mlp)
  cache = _lm('soft_moe_causal', {}).init_cache(2, 7)
  assert cache['layers'][1]['moe_x'].shape == (2, 7, 16) and 'moe_x' not in cache['layers'][0]


def test_capacity_makes_token_at_a_time_differ_but_prefix_rerouting_stays_exact():
  # Switch at eval capacity 0.5: the teacher-forced sequence (one group) drops tokens; a
  # decode step routes one token, which always fits, so the logits differ.
  kw = dict(capacity_factor=0.5, eval_capacity_factor=0.5)
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, V)
  model = _lm('switch', kw, engine='gather')
  got = decoding.incremental_logits(model, tokens)
  model.eval()
  aux = _teacher_forced_aux(model, tokens)
  assert float(aux['decoder/block_01']['metrics']['dropped_fraction']) > 0.2
  assert np.abs(np.asarray(got - _teacher_forced(model, tokens))).max() > 1e-3
  # A layer that re-routes the prefix keeps token-order drops exactly (the cache is as
  # long as the teacher-forced sequence).
  model = _lm('hash', dict(kind='previous', **kw), engine='gather')
  got = decoding.incremental_logits(model, tokens)
  model.eval()
  np.testing.assert_allclose(np.asarray(got), np.asarray(_teacher_forced(model, tokens)),
                             atol=1e-5, rtol=1e-5)


def _seq2seq():
  return EncoderDecoder(**TINY, encoder_depth=1, decoder_depth=2, rngs=nnx.Rngs(0),
                        encoder_moe=dict(router='experts_choice', num_experts=4, layers=(0,)),
                        decoder_moe=dict(router='soft_moe_causal', num_experts=4, layers=(0,)))


def test_encoder_decoder_incremental_logits_equal_teacher_forced():
  model = _seq2seq()
  inputs = jax.random.randint(jax.random.key(1), (2, 9), 2, V)
  seg = jnp.array([[1] * 9, [1] * 6 + [0] * 3])                     # padded second input
  dec = jax.random.randint(jax.random.key(2), (2, 6), 2, V).at[:, 0].set(0)
  got = decoding.incremental_logits(model, dec, inputs=inputs, input_segment_ids=seg)
  model.eval()
  want = _seq2seq_teacher_forced(model, inputs, dec, seg)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_greedy_generation_takes_the_argmax_of_the_full_model_at_every_step():
  # The model is causal, so one teacher-forced pass over the generated sequence gives the
  # logits each step saw.
  model = _lm('switch', {})
  prompt = jax.random.randint(jax.random.key(3), (2, 3), 0, V)
  out = decoding.generate(model, prompt, max_new_tokens=5)
  assert out.shape == (2, 8)
  np.testing.assert_array_equal(np.asarray(out[:, :3]), np.asarray(prompt))
  model.eval()
  logits = np.asarray(_teacher_forced(model, out[:, :-1]))
  np.testing.assert_array_equal(np.argmax(logits[:, 2:], -1), np.asarray(out[:, 3:]))


def test_encoder_decoder_greedy_generation_and_eos_padding():
  model = _seq2seq()
  inputs = jax.random.randint(jax.random.key(1), (2, 9), 2, V)
  out = np.asarray(decoding.generate(model, inputs, max_new_tokens=5))
  assert out.shape == (2, 5)
  model.eval()
  dec = np.concatenate([np.zeros((2, 1), np.int32), out[:, :-1]], axis=1)   # T5 start id 0
  logits = np.asarray(_seq2seq_teacher_forced(model, inputs, jnp.asarray(dec), None))
  np.testing.assert_array_equal(np.argmax(logits, -1), out)
  eos = int(out[0, 1])                                              # pretend it ends a sequence
  padded = np.asarray(decoding.generate(model, inputs, max_new_tokens=5, eos_id=eos, pad_id=0))
  first = int(np.argmax(out[0] == eos))
  np.testing.assert_array_equal(padded[0, :first + 1], out[0, :first + 1])
  assert (padded[0, first + 1:] == 0).all()


def test_sampling_is_reproducible_and_top_1_is_greedy():
  model = _lm('switch', {})
  prompt = jax.random.randint(jax.random.key(3), (4, 2), 0, V)
  greedy = decoding.generate(model, prompt, max_new_tokens=6)
  top1 = decoding.generate(model, prompt, max_new_tokens=6, temperature=1.0,
                           rng=jax.random.key(0), top_k=1)
  np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))
  a = decoding.generate(model, prompt, max_new_tokens=6, temperature=5.0, rng=jax.random.key(1))
  b = decoding.generate(model, prompt, max_new_tokens=6, temperature=5.0, rng=jax.random.key(1))
  c = decoding.generate(model, prompt, max_new_tokens=6, temperature=5.0, rng=jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (np.asarray(a) != np.asarray(c)).any()       # 24 draws at a high temperature
  np.testing.assert_array_equal(np.asarray(a[:, :2]), np.asarray(prompt))
  with pytest.raises(ValueError, match='rng'):
    decoding.generate(model, prompt, max_new_tokens=2, temperature=1.0)

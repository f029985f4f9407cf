"""T5-style models: packing isolation, decoder causality for every causal router, the
non-causal-router error, hash routers on real token ids, presets' parameter counts."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from ml_collections import config_dict

from moe_jax.errors import ConfigError
from moe_jax.layers import ROUTERS
from moe_jax.models import MODELS, Decoder, EncoderDecoder
from moe_jax.models import t5

V = 64
TINY = dict(vocab_size=V, width=16, num_heads=2, mlp_dim=32)
# Router kwargs where a paper default needs more than 4 experts.
SMALL_E_KWARGS = {'deepseek': dict(k=2), 'noisy_top_k': dict(k=2), 'dselect_k': dict(k=2)}
CAUSAL = sorted(n for n, c in ROUTERS.items() if c.causal)
NON_CAUSAL = [(n, {}) for n, c in sorted(ROUTERS.items()) if not c.causal] + [
    ('tokens_choice', dict(router_kwargs=dict(batch_priority=True))),
    ('hash', dict(router_kwargs=dict(kind='next'))),
    ('switch', dict(group_size=32))]


def n_params(model) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(model, nnx.Param)))


def moe(router, **kw):
  return {**dict(router=router, num_experts=4, layers=(0,),
                 router_kwargs=SMALL_E_KWARGS.get(router, {})), **kw}


@nnx.jit
def lm_forward(model, tokens, segment_ids, positions):
  return model(tokens, segment_ids=segment_ids, positions=positions)


@nnx.jit
def seq2seq_forward(model, inputs, dec, in_seg, tgt_seg, in_pos, tgt_pos):
  return model(inputs, dec, input_segment_ids=in_seg, target_segment_ids=tgt_seg,
               input_positions=in_pos, target_positions=tgt_pos)


def _packed(lengths, total):
  """segment_ids, positions [1, total] for documents of `lengths`, then padding."""
  seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] +
                       [np.zeros(total - sum(lengths))]).astype(np.int32)
  pos = np.concatenate([np.arange(n) for n in lengths] +
                       [np.zeros(total - sum(lengths))]).astype(np.int32)
  return jnp.asarray(seg[None]), jnp.asarray(pos[None])


@pytest.mark.parametrize('moe_cfg', [None, moe('switch', engine='dropless', layers=(0, 1))])
def test_decoder_packing_isolates_documents(moe_cfg):
  model = Decoder(**TINY, depth=2, moe=moe_cfg, rngs=nnx.Rngs(0))
  seg, pos = _packed([5, 6], 14)
  tokens = jax.random.randint(jax.random.key(1), (1, 14), 2, V)
  other = tokens.at[0, :5].set((tokens[0, :5] + 7) % V)          # change document 1 only
  a, _ = lm_forward(nnx.clone(model), tokens, seg, pos)      # same RNG state (router jitter)
  b, _ = lm_forward(nnx.clone(model), other, seg, pos)
  np.testing.assert_allclose(np.asarray(a[0, 5:11]), np.asarray(b[0, 5:11]), atol=1e-6)
  assert np.abs(np.asarray(a[0, :5] - b[0, :5])).max() > 1e-3  # document 1 did change


def test_encoder_decoder_packing_isolates_documents():
  # Token-local routing without drops in both stacks: a row-wide router (expert choice)
  # would let documents compete for capacity, which is routing, not attention.
  model = EncoderDecoder(**TINY, encoder_depth=2, decoder_depth=2, rngs=nnx.Rngs(0),
                         encoder_moe=moe('switch', engine='dropless'),
                         decoder_moe=moe('switch', engine='dropless'))
  in_seg, in_pos = _packed([4, 7], 12)
  tgt_seg, tgt_pos = _packed([3, 4], 8)
  inputs = jax.random.randint(jax.random.key(1), (1, 12), 2, V)
  dec = jax.random.randint(jax.random.key(2), (1, 8), 2, V)
  run = lambda i, d: np.asarray(seq2seq_forward(nnx.clone(model), i, d, in_seg, tgt_seg, in_pos,
                                                tgt_pos)[0][0])
  a = run(inputs, dec)
  b = run(inputs.at[0, :4].set((inputs[0, :4] + 5) % V), dec.at[0, :3].set((dec[0, :3] + 5) % V))
  np.testing.assert_allclose(a[3:7], b[3:7], atol=1e-6)             # document 2 unmoved
  assert np.abs(a[:3] - b[:3]).max() > 1e-3
  c = run(inputs.at[0, 4:11].set((inputs[0, 4:11] + 5) % V), dec)   # document 2's inputs
  np.testing.assert_allclose(a[:3], c[:3], atol=1e-6)               # document 1 unmoved
  assert np.abs(a[3:7] - c[3:7]).max() > 1e-3


@nnx.jit
def _train_forward(model, tokens):
  return model(tokens)[0]


# Top-2 token choice in the Google codebases' order gives every first choice a slot
# before any second choice, so a later token's first choice could drop an earlier token's
# second choice; in a causal context routers assign slots token by token instead, which
# these cases (capacity binding) check.
# Binding capacity (half the tokens fit) for every router that drops tokens: drops must
# depend on earlier tokens only. Soft routers have no capacity to bind.
CAUSALITY_CASES = [
    (r, dict(SMALL_E_KWARGS.get(r, {}),
             **({'capacity_factor': 0.5} if 'capacity_factor' in ROUTERS[r].accepted_kwargs()
                and 'soft' not in r else {})))
    for r in CAUSAL] + [('tokens_choice', dict(k=2, capacity_factor=0.5))]


@pytest.mark.parametrize('router, kwargs', CAUSALITY_CASES,
                         ids=[f'{r}-{kw}' for r, kw in CAUSALITY_CASES])
def test_decoder_outputs_ignore_later_tokens_for_every_causal_router(router, kwargs):
  """Logits before position 9 stay put (1e-6) when tokens from 9 on change; training mode,
  both calls from the same RNG state."""
  model = Decoder(**TINY, depth=2, moe=dict(moe(router), layers=(1,), router_kwargs=kwargs),
                  rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, V)
  a = np.asarray(_train_forward(nnx.clone(model), tokens))
  b = np.asarray(_train_forward(nnx.clone(model), tokens.at[:, 9:].set((tokens[:, 9:] + 11) % V)))
  assert np.abs(a[:, 9:] - b[:, 9:]).max() > 1e-4                  # the change is visible
  np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-6, rtol=0)


@pytest.mark.parametrize('router, extra', NON_CAUSAL)
def test_non_causal_router_in_a_decoder_is_an_error_unless_leak_allowed(router, extra):
  cfg = dict(router=router, num_experts=4, every=2, **extra)
  with pytest.raises(ConfigError) as e:
    Decoder(**TINY, depth=2, moe=cfg, rngs=nnx.Rngs(0))
  msg = str(e.value)
  assert e.value.field == 'config.model.moe.router'
  assert repr(router) in msg and 'decoder/block_01' in msg
  assert 'switch' in msg and 'allow_future_leak' in msg            # names the alternatives
  with pytest.raises(ConfigError, match='decoder_moe.router'):
    EncoderDecoder(**TINY, encoder_depth=2, decoder_depth=2, decoder_moe=cfg, rngs=nnx.Rngs(0))
  Decoder(**TINY, depth=2, moe=dict(cfg, allow_future_leak=True), rngs=nnx.Rngs(0))
  EncoderDecoder(**TINY, encoder_depth=2, decoder_depth=2, encoder_moe=cfg, rngs=nnx.Rngs(0))


def test_hash_routers_route_on_the_real_token_ids():
  table = np.arange(V) % 4                                         # token id -> expert
  cfg = dict(router='hash', num_experts=4, layers=(0,), router_kwargs=dict(table=table))
  model = EncoderDecoder(**TINY, encoder_depth=1, decoder_depth=1, encoder_moe=cfg,
                         decoder_moe=cfg, rngs=nnx.Rngs(0))
  inputs = jnp.full((2, 8), 6)                                     # all to expert 2
  dec = jnp.array([[0, 5, 5, 9, 9, 9, 13, 1]] * 2)                 # experts 0,1,1,1,1,1,1,1
  _, aux = seq2seq_forward(model, inputs, dec, None, None, None, None)
  np.testing.assert_allclose(aux['encoder/block_00']['metrics']['expert_load'], [0, 0, 1, 0])
  np.testing.assert_allclose(aux['decoder/block_00']['metrics']['expert_load'],
                             [1 / 8, 7 / 8, 0, 0])


def test_moe_placement_aux_names_and_expert_defaults():
  model = EncoderDecoder(**TINY, encoder_depth=4, decoder_depth=4, rngs=nnx.Rngs(0),
                         encoder_moe=dict(router='switch', num_experts=4, every=2),
                         decoder_moe=dict(router='switch', num_experts=4, every=4),
                         moe_extra_mlp=True)
  assert model.encoder.moe_blocks == (1, 3) and model.decoder.moe_blocks == (3,)
  layer = model.decoder.blocks[3].mlp
  # Experts follow the model's MLP (GEGLU, no biases) unless the MoE dict says otherwise.
  assert layer.experts.glu and layer.experts.b_in is None and layer.experts.activation == 'gelu'
  assert layer.context.causal and layer.context.name == 'decoder/block_03'
  assert not model.encoder.blocks[1].mlp.context.causal
  assert model.decoder.blocks[3].mlp_extra is not None and model.decoder.blocks[2].mlp_extra is None
  _, aux = seq2seq_forward(model, jnp.ones((2, 6), jnp.int32), jnp.ones((2, 5), jnp.int32),
                           None, None, None, None)
  assert sorted(aux) == ['decoder/block_03', 'encoder/block_01', 'encoder/block_03']


def test_one_relative_bias_per_stack_and_no_biases():
  model = EncoderDecoder(**TINY, encoder_depth=2, decoder_depth=2, rngs=nnx.Rngs(0))
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]]
  assert sum('rel_bias' in p for p in paths) == 2
  assert not any(p.endswith("'bias']") for p in paths)
  assert any('fc_gate' in p for p in paths)                        # GEGLU
  assert model.encoder.rel_bias.bidirectional and not model.decoder.rel_bias.bidirectional


def test_tied_embeddings_compute_logits_with_the_embedding():
  model = Decoder(**TINY, depth=1, tie_embeddings=True, rngs=nnx.Rngs(0))
  untied = Decoder(**TINY, depth=1, rngs=nnx.Rngs(0))
  assert model.head is None and n_params(untied) - n_params(model) == V * 16
  tokens = jax.random.randint(jax.random.key(0), (2, 5), 0, V)
  y, _ = model.decoder(model.embed(tokens), tokens)
  want = np.asarray(y) @ np.asarray(model.embed.embedding[...]).T / 4.0
  np.testing.assert_allclose(np.asarray(model(tokens)[0]), want, rtol=1e-5, atol=1e-5)


def test_models_build_from_config_dicts_as_the_trainer_does():
  c = ml_collections.ConfigDict(dict(name='decoder', size='tiny', depth=2, dtype='bfloat16',
                                     **TINY))
  c.moe = ml_collections.ConfigDict(dict(
      router='switch', num_experts=4, router_kwargs=dict(capacity_factor=2.0), every=2,
      engine='gather', expert_hidden=config_dict.placeholder(int),
      group_size=config_dict.placeholder(int), last_n=config_dict.placeholder(int),
      layers=config_dict.placeholder(tuple), glu=config_dict.placeholder(bool)))
  model = MODELS[c.name](**{k: v for k, v in c.items() if k != 'name'}, rngs=nnx.Rngs(0))
  assert model.size == 'tiny' and model.decoder.blocks[1].mlp.experts.glu   # default: GEGLU
  logits, aux = lm_forward(model, jnp.ones((2, 4), jnp.int32), None, None)
  assert logits.dtype == jnp.float32 and list(aux) == ['decoder/block_01']
  c.moe.typo = 1
  with pytest.raises(ConfigError, match=r'config\.model\.moe.*typo'):
    MODELS[c.name](**{k: v for k, v in c.items() if k != 'name'}, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('field, value', [('depth', 0), ('num_heads', 0), ('vocab_size', 0),
                                          ('mlp_dim', -1), ('encoder_depth', 0)])
def test_sizes_must_be_positive_integers_before_anything_divides_by_them(field, value):
  from moe_jax.train import config_lib
  name = 'encoder_decoder' if field == 'encoder_depth' else 'decoder'
  depths = dict(encoder_depth=2, decoder_depth=2) if name == 'encoder_decoder' else dict(depth=2)
  c = ml_collections.ConfigDict(dict(name=name, **depths, **TINY))
  c[field] = value
  with pytest.raises(ConfigError, match=rf'^config\.model\.{field}: must be a positive integer, '
                                        rf'got {value}\.'):
    config_lib.build_abstract_model(c)


@functools.lru_cache(maxsize=None)
def _preset_params_cached(name):
  return _preset_params(name)


def _preset_params(name, **override):
  p = dict(t5.PRESETS[name], **override)
  return n_params(nnx.eval_shape(lambda: EncoderDecoder(**p, rngs=nnx.Rngs(0))))


# Published counts: t5 repo released_checkpoints.md (t5.1.1 small ~77M, base ~250M);
# Switch Transformer paper (Fedus et al. 2022) §3 / Table 7 (dense T5-Base 223M; Switch-Base
# with 64 / 128 experts 3.8B / 7.4B). Tolerances: half a unit of the published rounding.
@pytest.mark.parametrize('name, override, published, rel_tol', [
    ('t5_1_1_small', {}, 77e6, 0.01), ('t5_1_1_base', {}, 250e6, 0.02),
    ('t5_base', {}, 223e6, 0.003), ('switch_base_128', {}, 7.4e9, 0.007),
    ('switch_base_128', dict(encoder_moe=dict(t5._SWITCH_BASE_MOE, num_experts=64),
                             decoder_moe=dict(t5._SWITCH_BASE_MOE, num_experts=64)), 3.8e9, 0.014)])
def test_paper_presets_have_the_published_parameter_counts(name, override, published, rel_tol):
  n = _preset_params(name, **override) if override else _preset_params_cached(name)
  assert abs(n / published - 1) < rel_tol


def test_t5x_moe_presets_match_their_closed_form_counts():
  """No paper gives these two counts: check them against the architecture's arithmetic."""
  d, f, v, layers = 768, 2048, 32128, 12
  attn, mlp = 4 * d * 768, 3 * d * f                    # 12 heads x 64 = 768, GEGLU
  dense = (2 * v * d + layers * (attn + mlp + 2 * d) + layers * (2 * attn + mlp + 3 * d)
           + 2 * d + 2 * 32 * 12)
  assert _preset_params_cached('t5_1_1_base') == dense
  # 3 MoE blocks per stack (every fourth of 12): E experts replace one MLP, plus a router.
  top2 = dense + 6 * ((64 - 1) * mlp + d * 64)
  assert _preset_params('tokens_choose_base') == top2
  st = dense + 6 * ((16 - 1) * mlp + d * 16 + mlp + d)  # + the extra dense MLP and its norm
  assert _preset_params('st_moe_base') == st


def test_every_parameter_gets_a_finite_gradient():
  model = EncoderDecoder(**TINY, encoder_depth=1, decoder_depth=2, rngs=nnx.Rngs(0),
                         encoder_moe=moe('switch'), decoder_moe=moe('switch', layers=(1,)))
  inputs = jax.random.randint(jax.random.key(1), (2, 8), 0, V)
  dec = jax.random.randint(jax.random.key(2), (2, 5), 0, V)

  @nnx.jit
  def grads(model):
    def loss(model):
      logits, aux = model(inputs, dec)
      aux_loss = sum(jax.tree.leaves([a['losses'] for a in aux.values()]))
      return -jnp.mean(jax.nn.log_softmax(logits)[..., 3]) + aux_loss
    return nnx.grad(loss)(model)
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(grads(model), nnx.Param))[0]
  norms = {jax.tree_util.keystr(p): float(jnp.linalg.norm(g)) for p, g in flat}
  assert all(np.isfinite(v) for v in norms.values())
  # An expert that received no token has a zero gradient; every other parameter moves.
  zero = [p for p, v in norms.items() if v == 0 and 'experts' not in p]
  assert not zero, zero
  assert sum(v for p, v in norms.items() if 'experts' in p) > 0

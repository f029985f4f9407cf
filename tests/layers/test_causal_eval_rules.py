"""Causal evaluation rules of routers that train non-causally.

Expert choice's `eval_rule='token_top_k'` against numpy (each token's top-k experts by
softmax probability, weight = that probability, nothing dropped), the layer output
against a numpy MoE, training unchanged; and, in a decoder trained with
`allow_future_leak=True`, eval-mode logits at t independent of tokens after t for expert
choice's causal rule and for BASE, Sinkhorn-BASE and REINFORCE, whose eval rules are the
greedy ones their papers use at test time (while EC's own rule does read later tokens).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import nnx

from moe_jax import layers
from moe_jax.models import Decoder
from moe_jax.routing.experts_choice import experts_choice_token_eval, token_eval_k
from tests.routing.helpers import combine_of, run


def _numpy_top_k(logits, k):
  """[G, S, E] combine weights: softmax probability on each token's k best experts."""
  probs = scipy.special.softmax(logits.astype(np.float64), axis=-1)
  out = np.zeros_like(probs)
  top = np.argsort(-probs, axis=-1, kind='stable')[..., :k]
  np.put_along_axis(out, top, np.take_along_axis(probs, top, -1), -1)
  return out


@pytest.mark.parametrize('k', [1, 2, 3])
def test_token_eval_rule_is_per_token_top_k_without_drops(k):
  logits = (2 * np.random.default_rng(k).normal(size=(3, 12, 5))).astype(np.float32)
  r = run(experts_choice_token_eval, logits, k=k)
  np.testing.assert_allclose(combine_of(r), _numpy_top_k(logits, k), rtol=1e-5, atol=1e-7)
  assert r.capacity == 12 and float(r.metrics['dropped_fraction']) == 0.0
  np.testing.assert_allclose(float(r.metrics['router_logit_max']), np.abs(logits).max(), rtol=1e-6)


def test_eval_k_defaults_to_the_rounded_capacity_factor():
  assert [token_eval_k(c) for c in (0.5, 1.0, 1.6, 2.0, 3.0)] == [1, 1, 2, 2, 3]


def _layer(eval_rule, capacity_factor=2.0):
  return layers.MoeLayer(d_model=8, num_experts=4, expert_hidden=16, router='experts_choice',
                         router_kwargs=dict(capacity_factor=capacity_factor, eval_rule=eval_rule),
                         rngs=nnx.Rngs(0))


@nnx.jit
def _apply(layer, x):
  return layer(x)[0]


def test_layer_in_eval_mode_matches_a_numpy_moe_and_training_is_unchanged():
  x = jax.random.normal(jax.random.key(1), (2, 10, 8))
  causal, plain = _layer('token_top_k'), _layer('experts_choice')
  np.testing.assert_allclose(np.asarray(_apply(causal, x)), np.asarray(_apply(plain, x)),
                             atol=1e-6)                       # training: expert choice
  causal.eval()
  y = np.asarray(_apply(causal, x))
  params = {'/'.join(map(str, p)): np.asarray(v[...], np.float64)
            for p, v in nnx.to_flat_state(nnx.state(causal, nnx.Param))}
  xs = np.asarray(x, np.float64)
  logits = xs @ params['router/gate/kernel']
  weights = _numpy_top_k(logits, 2)                           # k = round(2.0)
  hidden = np.einsum('gsd,edh->gseh', xs, params['experts/w_in']) + params['experts/b_in'][None, None]
  gelu = 0.5 * hidden * (1 + np.tanh(np.sqrt(2 / np.pi) * (hidden + 0.044715 * hidden ** 3)))
  out = np.einsum('gseh,ehd->gsed', gelu, params['experts/w_out']) + params['experts/b_out'][None, None]
  np.testing.assert_allclose(y, np.einsum('gse,gsed->gsd', weights, out), rtol=2e-4, atol=2e-5)


V = 64
TINY = dict(vocab_size=V, width=16, num_heads=2, mlp_dim=32)
LEAKY_TRAINING = [('experts_choice', dict(capacity_factor=1.0, eval_rule='token_top_k')),
                  ('base', {}), ('sinkhorn_base', {}), ('reinforce', dict(capacity_factor=0.5))]


@nnx.jit
def _logits(model, tokens):
  return model(tokens)[0]


def _eval_logits_change_before_9(router, kwargs):
  model = Decoder(**TINY, depth=2, rngs=nnx.Rngs(0),
                  moe=dict(router=router, num_experts=4, layers=(1,), router_kwargs=kwargs,
                           allow_future_leak=True))
  model.eval()
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, V)
  a = np.asarray(_logits(model, tokens))
  b = np.asarray(_logits(model, tokens.at[:, 9:].set((tokens[:, 9:] + 11) % V)))
  assert np.abs(a[:, 9:] - b[:, 9:]).max() > 1e-4                  # the change is visible
  return np.abs(a[:, :9] - b[:, :9]).max()


@pytest.mark.parametrize('router, kwargs', LEAKY_TRAINING, ids=[r for r, _ in LEAKY_TRAINING])
def test_eval_rule_of_a_leaky_decoder_router_is_causal(router, kwargs):
  assert _eval_logits_change_before_9(router, kwargs) <= 1e-6


def test_expert_choice_training_rule_reads_later_tokens_in_eval_mode():
  assert _eval_logits_change_before_9('experts_choice', dict(capacity_factor=1.0)) > 1e-4

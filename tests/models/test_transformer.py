"""Shared parts: the MLP (against numpy and against an expert holding its weights), the
MLP-or-MoE factory and the MoE option defaults."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.errors import ConfigError
from moe_jax.layers import Experts, LayerContext, MoeLayer
from moe_jax.models.transformer import Mlp, make_mlp, moe_config


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize('glu', [False, True])
def test_mlp_matches_numpy_and_an_expert_with_the_same_weights(glu):
  mlp = Mlp(6, 10, glu=glu, use_bias=not glu, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(2, 3, 6)).astype(np.float32)
  k = lambda lin: np.asarray(lin.kernel[...], np.float64)
  if glu:          # GEGLU: the gelu branch is fc_gate, the linear branch fc1
    want = (_gelu(x @ k(mlp.fc_gate)) * (x @ k(mlp.fc1))) @ k(mlp.fc2)
  else:
    b = lambda lin: np.asarray(lin.bias[...], np.float64)
    want = _gelu(x @ k(mlp.fc1) + b(mlp.fc1)) @ k(mlp.fc2) + b(mlp.fc2)
  got = np.asarray(mlp(jnp.asarray(x)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Upcycling maps fc1 -> w_in, fc_gate -> w_gate, fc2 -> w_out: same function.
  experts = Experts(1, 6, 10, glu=glu, use_bias=not glu, rngs=nnx.Rngs(1))
  params = dict(w_in=mlp.fc1.kernel[...][None], w_out=mlp.fc2.kernel[...][None])
  if glu:
    params['w_gate'] = mlp.fc_gate.kernel[...][None]
  else:
    params.update(b_in=mlp.fc1.bias[...][None], b_out=mlp.fc2.bias[...][None])
  np.testing.assert_allclose(np.asarray(experts.apply_weights(params, jnp.asarray(x.reshape(1, 6, 6)))),
                             got.reshape(1, 6, 6), rtol=1e-5, atol=1e-6)


def test_make_mlp_returns_a_dense_mlp_or_the_configured_moe_layer():
  ctx = LayerContext(tokens_per_group=8, causal=True, name='decoder/block_01')
  assert isinstance(make_mlp(8, 16, moe=None, context=ctx, rngs=nnx.Rngs(0)), Mlp)
  cfg = moe_config(dict(router='switch', num_experts=4, expert_hidden=12, every=1), field='m',
                   defaults=dict(glu=True, activation='relu', use_bias=False))
  layer = make_mlp(8, 16, moe=cfg, context=ctx, rngs=nnx.Rngs(0))
  assert isinstance(layer, MoeLayer) and layer.context == ctx
  assert layer.experts.hidden == 12 and layer.experts.glu and layer.experts.activation == 'relu'
  y, aux = layer(jnp.ones((2, 8, 8)))
  assert y.shape == (2, 8, 8) and 'losses' in aux
  with pytest.raises(ConfigError) as e:
    make_mlp(8, 16, moe=moe_config(dict(router='soft_moe', num_experts=4, every=1), field='m'),
             context=ctx, field='config.model.moe', rngs=nnx.Rngs(0))
  assert e.value.field == 'config.model.moe.router'


def test_moe_config_defaults_fill_missing_and_unset_values_only():
  d = dict(activation='relu', glu=True, use_bias=False)
  assert moe_config(None, field='m') is None
  assert moe_config(dict(router='dense', num_experts=4), field='m', defaults=d) is None
  cfg = moe_config(dict(router='switch', num_experts=4, glu=None, use_bias=True, every=2),
                   field='m', defaults=d)
  assert (cfg.activation, cfg.glu, cfg.use_bias) == ('relu', True, True)
  with pytest.raises(ConfigError, match=r'^m: unknown'):
    moe_config(dict(router='switch', num_experts=4, every=2, typo=1), field='m')

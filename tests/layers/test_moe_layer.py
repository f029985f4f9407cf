"""MoeLayer: output against numpy given the routing, routing groups, dropped tokens,
and clear errors on bad input."""
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from moe_jax import layers
from moe_jax.errors import ConfigError

jit = functools.partial(jax.jit, compiler_options=dict(xla_backend_optimization_level=0,
                                                       xla_cpu_use_fusion_emitters=False))
B, S, D, E, H = 2, 8, 16, 4, 32


def np_gelu(v):
  return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))


def np_expert_outputs(layer, x):
  """[G, S, E, d]: every expert's MLP applied to every token (numpy, float64)."""
  p = {k: np.asarray(v, np.float64) for k, v in layer.experts.params_dict().items()}
  h = np_gelu(np.einsum('gsd,edh->gseh', x, p['w_in']) + p['b_in'])
  return np.einsum('gseh,ehd->gsed', h, p['w_out']) + p['b_out']


@jit
def forward_with_routing(layer, x):
  y, aux = layer(x)
  return y, aux, layer.router(x).dense()


@pytest.mark.parametrize('router, kwargs', [
    ('tokens_choice', dict(k=2, capacity_factor=0.5)),
    ('experts_choice', dict(capacity_factor=1.0)),
])
def test_output_is_the_combine_weighted_sum_of_expert_outputs(router, kwargs):
  """y[s] = Σ_{e,c} combine[s, e, c] · f_e(x[s]); a token that got no slot outputs 0."""
  layer = layers.MoeLayer(D, E, H, router=router, router_kwargs=kwargs, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(B, S, D)).astype(np.float32)
  y, aux, (dispatch, combine) = forward_with_routing(layer, x)
  weight = np.asarray(combine, np.float64).sum(-1)                 # [G, S, E]
  expected = np.einsum('gse,gsed->gsd', weight, np_expert_outputs(layer, x.astype(np.float64)))
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
  unrouted = np.asarray(dispatch).sum((2, 3)) == 0
  assert unrouted.any()                                            # the case is exercised
  assert np.all(np.asarray(y)[unrouted] == 0.0)
  np.testing.assert_allclose(aux['metrics']['unrouted_fraction'], unrouted.mean(), rtol=1e-6)


def test_group_size_regroups_tokens():
  """group_size=B·S routes all tokens of the batch jointly: the same as one long
  example with the default (one group per example)."""
  kw = dict(router='tokens_choice', router_kwargs=dict(k=1, capacity_factor=1.0))
  default = layers.MoeLayer(D, E, H, rngs=nnx.Rngs(0), **kw)
  joint = layers.MoeLayer(D, E, H, group_size=B * S, rngs=nnx.Rngs(0), **kw)
  x = np.random.default_rng(1).normal(size=(B, S, D)).astype(np.float32)
  fwd = jit(lambda m, x: m(x)[0])
  np.testing.assert_allclose(fwd(joint, x), fwd(default, x.reshape(1, B * S, D)).reshape(B, S, D),
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='do not split into routing groups of group_size=5'):
    layers.MoeLayer(D, E, H, group_size=5, rngs=nnx.Rngs(0), **kw)(x)


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(router='top_k'), ValueError, "unknown router 'top_k'; choose one of"),
    (dict(engine='scatter'), ValueError, "unknown engine 'scatter'; choose one of"),
    (dict(router_kwargs=dict(k=5)), ValueError, 'k=5 must be between 1 and num_experts=4'),
    (dict(router_kwargs=dict(capacity_factor=0.0)), ConfigError,
     '^capacity_factor: must be > 0'),
    (dict(router_kwargs=dict(capacity_factor=-1.0)), ConfigError,
     '^capacity_factor: must be > 0'),
    (dict(router_kwargs=dict(eval_capacity_factor=0.0)), ConfigError,
     '^eval_capacity_factor: must be > 0'),
    (dict(router='experts_choice', router_kwargs=dict(capacity_factor=0.0)), ConfigError,
     '^capacity_factor: must be > 0'),
    (dict(router_kwargs=dict(capacity_rounding='up')), ConfigError,
     "^capacity_rounding: must be one of"),
    (dict(router_kwargs=dict(capacity_facter=2.0)), ConfigError,
     "^capacity_facter: TokensChoiceRouter takes no argument 'capacity_facter'. Did you mean "
     "'capacity_factor'"),
    (dict(router='experts_choice', router_kwargs=dict(k=2)), ConfigError,
     "^k: ExpertsChoiceRouter takes no argument 'k'"),
    (dict(engine_kwargs=dict(tile=4)), ConfigError, "^tile: engine 'gather' has no option 'tile'"),
    (dict(router='soft_moe', router_kwargs=dict(num_slots=0)), ValueError, 'num_slots >= 1'),
    (dict(activation='swish'), ValueError, 'activation must be one of'),
])
def test_bad_construction_raises_clear_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    layers.MoeLayer(D, E, H, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize('shape', [(B * S, D), (B, S, D + 1), (B, S, 1, D)])
def test_wrong_input_shape_raises(shape):
  layer = layers.MoeLayer(D, E, H, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'expects x of shape \[B, S, 16\]'):
    layer(np.zeros(shape, np.float32))

"""`Experts`: independent per-expert initialisation and the MLP variants vs numpy."""
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from moe_jax.layers import Experts

jit = functools.partial(jax.jit, compiler_options=dict(xla_backend_optimization_level=0,
                                                       xla_cpu_use_fusion_emitters=False))
E, D, H = 4, 16, 32


def np_gelu(x):
  """GELU, tanh approximation (Hendrycks & Gimpel 2016; jax.nn.gelu's default)."""
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_silu(x):
  return x / (1 + np.exp(-x))


def np_experts(params, x, act, glu):
  """y_e = W_out act(x W_in + b_in) + b_out, or W_out (act(x W_gate) * (x W_in + b_in)) + b_out."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  out = []
  for e in range(x.shape[0]):
    h = x[e] @ p['w_in'][e] + p['b_in'][e]
    h = act(x[e] @ p['w_gate'][e]) * h if glu else act(h)
    out.append(h @ p['w_out'][e] + p['b_out'][e])
  return np.stack(out)


def test_experts_are_initialised_independently():
  experts = Experts(E, D, H, rngs=nnx.Rngs(0))
  w_in, w_out = np.asarray(experts.w_in[...]), np.asarray(experts.w_out[...])
  assert w_in.shape == (E, D, H) and w_out.shape == (E, H, D)
  for w in (w_in, w_out):
    for a in range(E):
      for b in range(a + 1, E):
        assert not np.allclose(w[a], w[b])
        assert abs(np.corrcoef(w[a].ravel(), w[b].ravel())[0, 1]) < 0.2
  # LeCun normal per expert: the fan-in is one expert's input width (not E·d).
  np.testing.assert_allclose(w_in.std(), 1 / np.sqrt(D), rtol=0.1)
  np.testing.assert_allclose(w_out.std(), 1 / np.sqrt(H), rtol=0.1)
  assert np.all(np.asarray(experts.b_in[...]) == 0) and np.all(np.asarray(experts.b_out[...]) == 0)
  assert experts.w_gate is None


@pytest.mark.parametrize('activation, glu, np_act', [
    ('gelu', False, np_gelu),     # ViT / T5-style expert MLP
    ('gelu', True, np_gelu),      # GEGLU (Shazeer 2020)
    ('silu', True, np_silu),      # SwiGLU
])
def test_mlp_variants_match_numpy(activation, glu, np_act):
  experts = Experts(E, D, H, activation=activation, glu=glu, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  # Non-zero biases so that they are checked too.
  experts.b_in[...] = rng.normal(size=(E, H)).astype(np.float32)
  experts.b_out[...] = rng.normal(size=(E, D)).astype(np.float32)
  x = rng.normal(size=(E, 5, D)).astype(np.float32)
  y = jit(lambda m, x: m(x))(experts, x)
  expected = np_experts(experts.params_dict(), x.astype(np.float64), np_act, glu)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
  assert experts.flops_per_token() == 2 * (3 if glu else 2) * D * H


def test_bad_activation_raises():
  with pytest.raises(ValueError, match='activation must be one of'):
    Experts(E, D, H, activation='tanh', rngs=nnx.Rngs(0))

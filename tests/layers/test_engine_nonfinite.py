"""A non-finite input token: where it spreads, per engine (documented in the README).

* `gather` and `dropless` read and write rows by index: the bad token's value reaches only
  the slots it fills and, through them, its own output (for routers whose choice for a
  token reads that token only, such as token choice with ample capacity).
* `einsum` multiplies by one-hot matrices: 0 · NaN = NaN, so the token poisons every slot of
  its routing group and every output of that group (vmoe and flaxformer behave the same).
* Soft MoE mixes every token into every slot in every engine: the whole group.
Other routing groups are never affected.
"""
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from moe_jax import layers

jit = functools.partial(jax.jit, compiler_options=dict(xla_backend_optimization_level=0,
                                                       xla_cpu_use_fusion_emitters=False))
B, S, D, E, H = 3, 8, 16, 4, 32


def _outputs(router, kwargs, engine, x):
  layer = layers.MoeLayer(D, E, H, router=router, router_kwargs=kwargs, engine=engine,
                          rngs=nnx.Rngs(0))
  layer.eval()
  return np.asarray(jit(lambda m, v: m(v)[0])(layer, x))


def _inputs():
  x = np.random.default_rng(0).normal(size=(B, S, D)).astype(np.float32)
  bad = x.copy()
  bad[0, 2, 5] = np.nan          # one value of token 2 of group (example) 0
  return x, bad


@pytest.mark.parametrize('engine', ['gather', 'dropless'])
def test_indexed_engines_keep_a_nan_in_its_own_token(engine):
  x, bad = _inputs()
  kw = dict(k=2, capacity_factor=float(E))        # ample: routing of others cannot change
  clean, out = _outputs('tokens_choice', kw, engine, x), _outputs('tokens_choice', kw, engine, bad)
  assert np.isnan(out[0, 2]).all()
  others = np.ones((B, S), bool)
  others[0, 2] = False
  np.testing.assert_allclose(out[others], clean[others], rtol=1e-6, atol=1e-6)


def test_the_einsum_engine_spreads_a_nan_to_its_routing_group_only():
  x, bad = _inputs()
  kw = dict(k=2, capacity_factor=float(E))
  clean = _outputs('tokens_choice', kw, 'einsum', x)
  out = _outputs('tokens_choice', kw, 'einsum', bad)
  assert np.isnan(out[0]).all()                   # the whole group
  np.testing.assert_allclose(out[1:], clean[1:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('engine', ['einsum', 'gather'])
def test_soft_moe_spreads_a_nan_to_its_group_in_every_engine(engine):
  x, bad = _inputs()
  clean = _outputs('soft_moe', dict(num_slots=2), engine, x)
  out = _outputs('soft_moe', dict(num_slots=2), engine, bad)
  assert np.isnan(out[0]).all()
  np.testing.assert_allclose(out[1:], clean[1:], rtol=1e-6, atol=1e-6)

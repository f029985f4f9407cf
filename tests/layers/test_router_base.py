"""The `Router` base: every router declares the keywords it takes (its own, the capacity
keywords, its routing function's pass-through ones), bad ones fail with a ConfigError that
names the field, and train / eval capacity comes from one `CapacitySpec`."""
import inspect
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from moe_jax import layers, routing
from moe_jax.errors import ConfigError
from moe_jax.routing.capacity import CAPACITY_KWARGS

D, E, S = 8, 4, 8


def keyword_only(fn):
  return {n for n, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY}


@pytest.mark.parametrize('name', sorted(layers.ROUTERS))
def test_every_router_declares_what_it_takes(name):
  cls = layers.ROUTERS[name]
  accepted = cls.accepted_kwargs()
  own = cls.own_kwargs()
  init = inspect.signature(cls.__init__).parameters
  assert {'rngs', 'context'} <= set(init), 'routers take rngs and context'
  assert any(p.kind == p.VAR_KEYWORD for p in init.values()), 'options reach the base check'
  assert own <= accepted and not own & {'d_model', 'num_experts', 'rngs', 'context'}
  passthrough = cls.passthrough_kwargs()
  if cls.routing_fn is not None:
    # Pass-through keywords are the routing function's, minus capacity and router-set ones.
    assert passthrough <= keyword_only(cls.routing_fn)
    assert not passthrough & (set(CAPACITY_KWARGS) | set(cls.set_by_router) | own)
    assert set(cls.set_by_router) <= keyword_only(cls.routing_fn)
  capacity = (accepted - own) & set(CAPACITY_KWARGS)
  assert capacity == (set(cls.capacity_kwargs) if cls.default_capacity else set()) - own
  # A typo names the field, the nearest keyword and everything the router takes.
  key = sorted(accepted)[0] + 'x'
  with pytest.raises(ConfigError) as e:
    cls.check_kwargs({key: 1})
  assert e.value.field == key and f'takes no argument {key!r}' in str(e.value)
  assert all(n in str(e.value) for n in accepted)


def test_construction_runs_the_same_check():
  with pytest.raises(ConfigError, match="^batch_prority: TokensChoiceRouter takes no argument "
                                        "'batch_prority'. Did you mean 'batch_priority'"):
    layers.ROUTERS['tokens_choice'](D, E, rngs=nnx.Rngs(0), batch_prority=True)
  with pytest.raises(ConfigError, match="^capacity_factor: DSelectKRouter takes no argument"):
    layers.ROUTERS['dselect_k'](D, E, rngs=nnx.Rngs(0), capacity_factor=1.0)   # eval only
  with pytest.raises(ConfigError, match='^min_capacity'):
    layers.ROUTERS['soft_moe'](D, E, rngs=nnx.Rngs(0), min_capacity=2)        # no capacity
  with pytest.raises(ConfigError, match='^k: k=5 must be between 1 and num_experts=4'):
    layers.ROUTERS['reinforce'](D, E, rngs=nnx.Rngs(0), k=5)


def test_subclass_forwarding_kwargs_keeps_its_parents_options():
  class Scaled(layers.TokensChoiceRouter):
    def __init__(self, d_model, num_experts, *, rngs, context=None, scale=2.0, **kwargs):
      super().__init__(d_model, num_experts, rngs=rngs, context=context, **kwargs)
      self.scale = scale
  assert {'scale', 'k', 'noise_std', 'batch_priority', 'capacity_factor'} <= Scaled.accepted_kwargs()
  Scaled.check_kwargs(dict(scale=1.0, k=2, batch_priority=True))
  assert Scaled(D, E, rngs=nnx.Rngs(0), k=2, renormalize=True).routing_kwargs == dict(
      renormalize=True)


# router -> (router_kwargs, k of the capacity formula). Capacity 0.5 / 1.5 in train / eval.
CAPACITY_CASES = {
    'tokens_choice': (dict(k=2), 2),
    'experts_choice': ({}, 1),
    'switch': ({}, 1),
    'straight_through': ({}, 1),
    'gshard_top2': ({}, 2),
    'noisy_top_k': (dict(k=2), 2),
    'deepseek': (dict(k=2), 2),
    'reinforce': (dict(k=2), 2),
    'hash': (dict(kind='multihash', num_hashes=2), 2),
    'sinkhorn_base': ({}, 1),
    'experts_choice_capped': (dict(max_experts_per_token=3), 1),
}


@pytest.mark.parametrize('name', sorted(CAPACITY_CASES))
def test_train_and_eval_capacity_from_the_flat_keywords(name):
  kwargs, k = CAPACITY_CASES[name]
  router = layers.ROUTERS[name](D, E, rngs=nnx.Rngs(0), capacity_factor=0.5,
                                eval_capacity_factor=1.5, **kwargs)
  x = jax.ShapeDtypeStruct((2, S, D), jnp.float32)
  ids = jax.ShapeDtypeStruct((2, S), jnp.int32)
  route = lambda r, x, i: r(x, token_ids=i)
  assert nnx.eval_shape(route, router, x, ids).capacity == math.ceil(k * S * 0.5 / E)
  router.eval()
  assert nnx.eval_shape(route, router, x, ids).capacity == min(S, math.ceil(k * S * 1.5 / E))


def test_eval_only_capacity_routers():
  for name in ('base', 'dselect_k'):
    router = layers.ROUTERS[name](D, E, rngs=nnx.Rngs(0), eval_capacity=3)
    x = jax.ShapeDtypeStruct((2, S, D), jnp.float32)
    router.eval()
    assert nnx.eval_shape(lambda r, x: r(x), router, x).capacity == 3, name
  assert layers.ROUTERS['dselect_k'].accepted_kwargs().isdisjoint({'capacity_factor', 'capacity'})


def test_moe_config_names_the_bad_field():
  def error(**moe):
    with pytest.raises(ConfigError) as e:
      layers.MoeConfig.from_dict(dict(dict(router='tokens_choice', num_experts=4), **moe))
    return e.value.field
  assert error(router_kwargs=dict(topk=2)) == 'config.model.moe.router_kwargs.topk'
  assert error(router_kwargs=dict(capacity_factor=0)) == (
      'config.model.moe.router_kwargs.capacity_factor')
  assert error(engine='dropless', engine_kwargs=dict(tiles=4)) == (
      'config.model.moe.engine_kwargs.tiles')
  assert error(engine='dropless', engine_kwargs=dict(impl='fast')) == (
      'config.model.moe.engine_kwargs')
  cfg = layers.MoeConfig.from_dict(dict(router='switch', num_experts=4, engine='dropless',
                                        engine_kwargs=dict(tile=8),
                                        router_kwargs=dict(capacity_factor=2.0,
                                                           capacity_rounding='floor')))
  layer = nnx.eval_shape(lambda: layers.MoeLayer.from_config(cfg, D, default_hidden=16,
                                                             rngs=nnx.Rngs(0)))
  assert layer.engine == layers.get_engine('dropless', tile=8)
  assert layer.router.capacity == routing.CapacitySpec(
      capacity_factor=2.0, eval_capacity_factor=2.0, capacity_rounding='floor')

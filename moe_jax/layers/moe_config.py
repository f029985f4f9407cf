"""`MoeConfig`: the typed MoE options of one stack, validated once; `LayerContext`: what a
layer learns from the model that holds it.

    moe = MoeConfig.from_dict(config.model.moe)    # None for router='dense'
    layer = MoeLayer.from_config(moe, d_model=64, default_hidden=128,
                                 context=LayerContext(tokens_per_group=16), rngs=rngs)

Every check raises `moe_jax.errors.ConfigError` naming the field, before anything is
built. The router's own keyword arguments are checked against the router class
(`Router.check_kwargs`), so a typo such as `topk=2` names the arguments the router takes;
the engine's options against the engine's fields.

`LayerContext` is the one route by which a model tells its MoE layers (and through them
their routers) what they cannot see in their own arguments:

* `tokens_per_group`: S of a routing group when the model knows it at build time (the
  ViT's patch count, a text model's sequence length); routers sized per group (Soft MoE
  with a capacity factor) read it.
* `causal`: the layer sits in a decoder, so token t's output may depend on tokens <= t
  only. Building a layer whose routing reads later tokens is then a `ConfigError`
  naming the causal routers, unless `allow_future_leak` is set (a research flag whose
  name says what it permits).
* `name`: the layer's place in the model ('decoder/block_03'), for messages.

Token ids (hash routers) are call-time inputs: `layer(x, token_ids=ids)`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from moe_jax.errors import ConfigError

PLACEMENT_KEYS = ('every', 'last_n', 'layers')


@dataclasses.dataclass(frozen=True)
class LayerContext:
  """What the model tells an MoE layer at build time (see the module docstring)."""
  tokens_per_group: int | None = None
  causal: bool = False
  allow_future_leak: bool = False
  name: str = ''


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """MoE options of one stack of blocks.

  Attributes:
    router: a key of `layers.ROUTERS`.
    num_experts: E.
    router_kwargs: keyword arguments of that router class.
    expert_hidden: hidden width of each expert (None: the dense MLP's width).
    engine: a key of `layers.ENGINES`; engine_kwargs: its options.
    group_size: tokens per routing group (None: one group per example).
    glu, activation, use_bias: the expert MLP (GEGLU/SwiGLU, 'gelu'/'relu'/'silu', biases).
    num_shared_experts, shared_expert_hidden: always-on experts (DeepSeek).
    every, last_n, layers: which blocks of the stack are MoE (`models.placement`).
    allow_future_leak: permit a non-causal router in a causal (decoder) stack.
  """
  router: str
  num_experts: int
  router_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  expert_hidden: int | None = None
  engine: str = 'gather'
  engine_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  group_size: int | None = None
  glu: bool = False
  activation: str = 'gelu'
  use_bias: bool = True
  num_shared_experts: int = 0
  shared_expert_hidden: int | None = None
  every: int | None = None
  last_n: int | None = None
  layers: tuple[int, ...] | None = None
  allow_future_leak: bool = False

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | None, *, field: str = 'config.model.moe') -> MoeConfig | None:
    """A config dict (or ConfigDict) -> a validated MoeConfig; None when router is 'dense'
    or `d` is None/empty. Raises ConfigError naming `field.<key>`."""
    if d is None:
      return None
    d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
    if not d or d.get('router', 'dense') == 'dense':
      return None
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ConfigError(f'unknown MoE option(s) {unknown}; known: {sorted(names)}.', field=field)
    for key in ('router_kwargs', 'engine_kwargs'):
      v = d.get(key)
      d[key] = dict(v.to_dict() if hasattr(v, 'to_dict') else (v or {}))
    if d.get('layers') is not None:
      d['layers'] = tuple(int(i) for i in d['layers'])
    try:
      cfg = cls(**d)
    except TypeError as e:
      raise ConfigError(str(e), field=field) from None
    try:
      cfg.validate()
    except ConfigError as e:
      raise e.under(field) from None
    return cfg

  def validate(self) -> None:
    """Raises ConfigError (field relative to the MoE block) for any bad value."""
    # Imported here: the registries import the router modules, which import this file's package.
    from moe_jax.layers.engines import ENGINES, get_engine
    from moe_jax.layers.experts import ACTIVATIONS
    from moe_jax.layers.routers import ROUTERS

    def need(ok, field, msg):
      if not ok:
        raise ConfigError(msg, field=field)

    need(self.router in ROUTERS, 'router',
         f"{self.router!r} is not 'dense' or one of {sorted(ROUTERS)}.")
    need(isinstance(self.num_experts, int) and self.num_experts >= 1, 'num_experts',
         f'must be an int >= 1, got {self.num_experts!r}.')
    need(self.engine in ENGINES, 'engine', f'{self.engine!r} is not one of {sorted(ENGINES)}.')
    need(self.activation in ACTIVATIONS, 'activation',
         f'{self.activation!r} is not one of {sorted(ACTIVATIONS)}.')
    for name in ('expert_hidden', 'group_size', 'shared_expert_hidden', 'every'):
      v = getattr(self, name)
      need(v is None or (isinstance(v, int) and v >= 1), name, f'must be None or an int >= 1, got {v!r}.')
    need(self.last_n is None or (isinstance(self.last_n, int) and self.last_n >= 0), 'last_n',
         f'must be None or an int >= 0, got {self.last_n!r}.')
    need(isinstance(self.num_shared_experts, int) and self.num_shared_experts >= 0,
         'num_shared_experts', f'must be an int >= 0, got {self.num_shared_experts!r}.')
    need(self.layers is None or (self.every is None and self.last_n is None), 'layers',
         'give MoE placement either as `layers` or as `every`/`last_n`, not both.')
    try:
      ROUTERS[self.router].check_kwargs(dict(self.router_kwargs), num_experts=self.num_experts)
    except ConfigError as e:
      raise e.under('router_kwargs') from None
    try:
      get_engine(self.engine, **dict(self.engine_kwargs))
    except ConfigError as e:
      raise e.under('engine_kwargs') from None
    except ValueError as e:   # an option's value, checked by the engine itself
      raise ConfigError(str(e), field='engine_kwargs') from None

  def placement(self) -> dict:
    """{'every', 'last_n', 'layers'} for `models.placement.moe_block_indices`."""
    return {k: getattr(self, k) for k in PLACEMENT_KEYS}

"""`MoeLayer`: router -> engine dispatch -> experts -> combine.

    layer = MoeLayer(d_model=64, num_experts=8, expert_hidden=128,
                     router='tokens_choice', router_kwargs=dict(k=2),
                     engine='gather', rngs=nnx.Rngs(0))
    y, aux = layer(x)          # x [B, S, d] -> y [B, S, d]
    aux['losses']   # name -> weighted scalar, add their sum to the task loss
    aux['metrics']  # name -> array (dropped_fraction, expert_load, router_entropy, ...)

Routing groups: by default one group per example (G = B, the group is a sequence or an
image). `group_size=n` instead regroups the B·S tokens into groups of n (V-MoE routes
groups of several images).

The engine is an object the layer holds (`layer.engine`, a frozen dataclass built from
`engine` and `engine_kwargs`); to run the same layer with another engine, assign one:
`layer.engine = layers.get_engine('dropless', tile=64)`.

Under `jax.set_mesh(mesh)` with a (`data`, `expert`, `model`) mesh of several devices the
layer runs expert-parallel (`moe_jax.parallel.expert_parallel`): each device routes its
own examples, all_to_all sends expert slots to the devices holding the experts. Same
numbers as on one device. Expert parallelism uses the layer through `router`,
`experts`, `engine`, `num_experts`, `group_size` and `route_and_apply` only.

`recording_moe_calls()` lists the MoE layer calls of a traced function (FLOP accounting
under `jax.eval_shape`, for any model); `recording_routings()` collects every layer's
`Routing` (the routing pictures of `moe_jax.inspection`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.errors import ConfigError
from moe_jax.layers.engines import get_engine
from moe_jax.layers.experts import Experts
from moe_jax.layers.moe_config import LayerContext, MoeConfig
from moe_jax.layers.routers import ROUTERS, get_router_class
from moe_jax.parallel import expert_parallel

Array = jax.Array


class MoeCall(NamedTuple):
  """One call of an MoE layer, as `recording_moe_calls` records it."""
  layer: Any                 # the MoeLayer
  x_shape: tuple[int, ...]   # [B, S, d]
  has_token_ids: bool


_RECORDINGS: list[list[MoeCall]] = []


@contextlib.contextmanager
def recording_moe_calls() -> Iterator[list[MoeCall]]:
  """While active, every `MoeLayer` call appends a `MoeCall` to the yielded list.

      with layers.recording_moe_calls() as calls:
        jax.eval_shape(lambda m, x: m(x), model, x)     # traces the model once
      for layer, (b, s, d), has_ids in calls: ...

  Calls are recorded when the layer's Python code runs: eagerly, or while a function is
  traced (a jit cache hit runs no Python and records nothing). Under `nnx.eval_shape`
  the recorded layers are the traced copies of the model's (same configuration). Trace
  a model in training mode through `nnx.eval_shape` (or a clone), not by closing over
  it in `jax.eval_shape`: routers with state (RNG counters, DeepSeek's counts) would
  keep tracers.
  """
  with _recording(_RECORDINGS) as calls:
    yield calls


@contextlib.contextmanager
def _recording(active: list[list]) -> Iterator[list]:
  """A fresh list, in `active` while the block runs (nested recordings each get all)."""
  found: list = []
  active.append(found)
  try:
    yield found
  finally:
    active[:] = [c for c in active if c is not found]


class RoutingRecord(NamedTuple):
  """One MoE layer call's routing, as `recording_routings` records it.

  `routing` covers the layer's routing groups [G, S', ...]: with `group_size` the
  batch's B·S tokens regrouped (and, where the router shuffles tokens, in the order
  `perm` [G·S']: routed position p holds token perm[p] of the flattened batch).
  """
  name: str                   # the layer's `LayerContext.name` ('block_03'), or ''
  routing: Any                # routing.Routing
  perm: Array | None          # [G·S'] or None
  batch_shape: tuple[int, int]   # (B, S) of the layer's input


_ROUTING_RECORDINGS: list[list[RoutingRecord]] = []


@contextlib.contextmanager
def recording_routings() -> Iterator[list[RoutingRecord]]:
  """While active, every single-device `MoeLayer` call appends a `RoutingRecord`.

      def f(model, x):
        with layers.recording_routings() as records:
          model(x)
        return {r.name: r.routing for r in records}     # Routing is a pytree
      routings = nnx.jit(f)(model, x)

  Recorded while the layer's Python code runs (eagerly or at trace time); the arrays
  are the trace's values, so return them from the traced function. Expert-parallel
  calls (under a mesh) record nothing: their routing lives inside `shard_map`.
  """
  with _recording(_ROUTING_RECORDINGS) as records:
    yield records


def _permute(a: Array, perm: Array) -> Array:
  """a: [G, S, ...] -> the same shape with its G·S tokens in the order `perm` [G·S]."""
  g, s = a.shape[:2]
  return a.reshape(g * s, *a.shape[2:])[perm].reshape(a.shape)


class MoeLayer(nnx.Module):
  """A Mixture-of-Experts MLP block.

  Args:
    d_model: d, token width.
    num_experts: E.
    expert_hidden: h, hidden width of each expert MLP.
    router: a key of `layers.ROUTERS`.
    router_kwargs: keyword arguments of that router class (see its docstring).
    engine: a key of `layers.ENGINES` ('einsum', 'gather', 'dropless').
    engine_kwargs: options of that engine (its dataclass fields, e.g. `tile` of dropless).
    activation: expert activation ('gelu', 'relu', 'silu').
    glu: gated expert MLP (GEGLU / SwiGLU).
    group_size: tokens per routing group; None = one group per example.
    dtype: compute dtype of the experts (None: the input's). Routing stays float32.
    rngs: `nnx.Rngs`.
    num_shared_experts: experts applied to every token, unweighted, their outputs added
      to the routed output (DeepSeekMoE / V3 "shared experts"; default 0).
    shared_expert_hidden: hidden width of each shared expert (default `expert_hidden`).
    use_bias: expert MLP biases (T5.1.1-style models have none).
    context: what the model tells the layer (`LayerContext`: tokens per group, whether it
      sits in a decoder); a causal context refuses routers that read later tokens. The
      router gets it with `tokens_per_group` = `group_size` when that is set.
  """

  def __init__(self, d_model: int, num_experts: int, expert_hidden: int, *,
               router: str = 'tokens_choice', router_kwargs: dict | None = None,
               engine: str = 'gather', engine_kwargs: dict | None = None,
               activation: str = 'gelu', glu: bool = False, group_size: int | None = None,
               dtype=None, rngs: nnx.Rngs, num_shared_experts: int = 0,
               shared_expert_hidden: int | None = None, use_bias: bool = True,
               context: LayerContext | None = None):
    context = context or LayerContext()
    if num_experts < 1:
      raise ValueError(f'num_experts must be >= 1, got {num_experts}.')
    self.d_model, self.num_experts, self.group_size = d_model, num_experts, group_size
    self.router_name = router
    self.engine = get_engine(engine, **dict(engine_kwargs or {}))
    router_cls = get_router_class(router)
    router_context = (context if group_size is None
                      else dataclasses.replace(context, tokens_per_group=group_size))
    self.router = router_cls(d_model, num_experts, context=router_context, rngs=rngs,
                             **dict(router_kwargs or {}))
    self.context = context
    if context.causal and not self.is_causal and not context.allow_future_leak:
      raise ConfigError(causal_error(router, self, context), field='router')
    self.experts = Experts(num_experts, d_model, expert_hidden, activation=activation, glu=glu,
                           use_bias=use_bias, dtype=dtype, rngs=rngs)
    if num_shared_experts < 0:
      raise ValueError(f'num_shared_experts must be >= 0, got {num_shared_experts}.')
    self.shared_experts = nnx.data(None)
    if num_shared_experts:
      self.shared_experts = Experts(num_shared_experts, d_model,
                                    shared_expert_hidden or expert_hidden, activation=activation,
                                    glu=glu, use_bias=use_bias, dtype=dtype, shard_experts=False,
                                    rngs=rngs)

  @classmethod
  def from_config(cls, cfg: MoeConfig, d_model: int, *, default_hidden: int,
                  context: LayerContext | None = None, dtype=None, rngs: nnx.Rngs) -> MoeLayer:
    """The layer `cfg` describes, `expert_hidden` defaulting to `default_hidden`."""
    return cls(d_model, cfg.num_experts, cfg.expert_hidden or default_hidden, router=cfg.router,
               router_kwargs=dict(cfg.router_kwargs), engine=cfg.engine,
               engine_kwargs=dict(cfg.engine_kwargs),
               activation=cfg.activation, glu=cfg.glu, group_size=cfg.group_size, dtype=dtype,
               num_shared_experts=cfg.num_shared_experts,
               shared_expert_hidden=cfg.shared_expert_hidden, use_bias=cfg.use_bias,
               context=dataclasses.replace(context or LayerContext(),
                                           allow_future_leak=cfg.allow_future_leak),
               rngs=rngs)

  @property
  def engine_name(self) -> str:
    """The engine's registry name ('einsum', 'gather', 'dropless')."""
    return self.engine.name

  @property
  def is_causal(self) -> bool:
    return self.router.is_causal and self.group_size is None

  def _group(self, x: Array) -> Array:
    b, s = x.shape[:2]
    if self.group_size is None:
      return x
    n = b * s
    if n % self.group_size:
      raise ValueError(f'{b}x{s}={n} tokens do not split into routing groups of '
                       f'group_size={self.group_size}; change group_size or the batch.')
    return x.reshape(n // self.group_size, self.group_size, *x.shape[2:])

  def __call__(self, x: Array, *, token_ids: Array | None = None) -> tuple[Array, dict]:
    """x: [B, S, d], token_ids: [B, S] int (hash routers) -> (y [B, S, d], aux)."""
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f'MoeLayer expects x of shape [B, S, {self.d_model}], got {x.shape}.')
    if self.router.needs_token_ids and token_ids is None:
      raise ValueError(f'router {self.router_name!r} needs token_ids: call layer(x, token_ids=ids).')
    for calls in _RECORDINGS:
      calls.append(MoeCall(self, tuple(x.shape), token_ids is not None))
    mesh = expert_parallel.active_mesh()
    if mesh is not None:
      y, aux = expert_parallel.moe_layer_apply(self, x, token_ids, mesh)
    else:
      on_routing = None
      if _ROUTING_RECORDINGS:
        def on_routing(r, perm):
          for records in _ROUTING_RECORDINGS:
            records.append(RoutingRecord(self.context.name, r, perm, tuple(x.shape[:2])))
      y, r = self.route_and_apply(x, token_ids, self.router, self.experts, on_routing=on_routing)
      aux = dict(losses=r.aux_losses, metrics=r.metrics)
    if self.shared_experts is not None:
      # Shared experts see every token and are replicated, so they stay outside shard_map.
      y = y + self._shared(x).astype(y.dtype)
    return y, aux

  def route_and_apply(self, x: Array, token_ids: Array | None, router, expert_fn, *,
                      on_routing=None):
    """Routes and runs experts: x [B, S, d] -> (y [B, S, d], Routing).

    Shared by the single-device path and, on each device's examples, the expert-parallel
    one, which passes its copy of `router` and, as `expert_fn`, what runs the experts:
    an `[E, N, d] -> [E, N, d]` function with the all_to_alls around it for buffer
    engines, a `parallel.expert_parallel.LocalExperts` for row engines. `on_routing(r,
    perm)` (optional) sees the Routing and the token permutation (None: no shuffle).
    """
    xg = self._group(x)
    ids = None if token_ids is None else self._group(token_ids)
    perm = router.token_permutation(*xg.shape[:2])
    if perm is not None:
      xg, ids = _permute(xg, perm), (None if ids is None else _permute(ids, perm))
    r = router(xg, token_ids=ids)
    if on_routing is not None:
      on_routing(r, perm)
    y = self.engine.apply(xg, r, expert_fn)
    if perm is not None:
      y = _permute(y, jnp.argsort(perm))
    return y.reshape(x.shape).astype(x.dtype), r

  def _shared(self, x: Array) -> Array:
    """Σ over shared experts of FFN_s(x): x [B, S, d] -> [B, S, d]."""
    n = self.shared_experts.num_experts
    tokens = x.reshape(1, -1, x.shape[-1])
    out = self.shared_experts(jnp.broadcast_to(tokens, (n,) + tokens.shape[1:]))
    return jnp.sum(out, axis=0).reshape(x.shape)


def causal_error(router: str, layer: MoeLayer, context: LayerContext) -> str:
  """The message for a non-causal router in a decoder: names the causal routers."""
  causal = sorted(n for n, c in ROUTERS.items() if c.causal)
  why = ('its routing groups span several sequences (group_size is set)'
         if layer.router.is_causal else
         'its routing of a token reads later tokens of the sequence')
  where = f' at {context.name}' if context.name else ''
  return (f'router {router!r}{where} sits in a decoder but {why}, so training would leak '
          f'future tokens. Use a causal router ({", ".join(causal)}; tokens_choice only '
          'without batch_priority) or set allow_future_leak=True in the MoE config to study '
          'the leak on purpose.')

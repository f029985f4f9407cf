"""The `Router` base class: what every router module shares.

    router = ROUTERS[name](d_model, num_experts, context=LayerContext(...), rngs=rngs,
                           **router_kwargs)
    r = router(x, token_ids=None)          # x: [G, S, d] -> routing.Routing

A router module is a thin Flax NNX module around a pure function of `moe_jax.routing`:
it owns its parameters and calls that function. The base owns what they share:

* **Keywords.** A router takes its constructor's own keywords, the capacity keywords
  (`capacity_kwargs`, when it has a `default_capacity`) and the pass-through keywords:
  the keyword-only arguments of its `routing_fn` that it neither sets itself
  (`set_by_router`) nor takes in its constructor; they reach `routing_fn` unchanged
  (`self.routing_kwargs`). `check_kwargs` rejects anything else with a `ConfigError`
  that names what the router takes; `MoeConfig.validate` calls it before anything is
  built, `Router.__init__` again for routers built by hand.
* **Capacity.** Train and eval capacity as one `routing.CapacitySpec`, parsed from the
  flat keywords (`capacity_factor=1.25, eval_capacity_factor=2.0`, ...) over the class's
  `default_capacity`. `self.slots(S, k)` is C in the current mode.
* **The linear gate** (`gate_init_scale`): logits = x·W in float32, Switch init.
* **Train / eval:** `deterministic`, set by NNX's `module.eval()` and `.train()`: noise,
  jitter and sampling happen in training only, and the eval capacity applies.
* **The RNG stream** `rngs`, a fork of the `gating` stream (`default` when absent), for
  routers that draw (`stochastic`) or add Gaussian logit noise (`noise_std`).
* **`after_step(rewards)`**: non-gradient state the trainer updates after the optimizer
  step (`layers.after_step` calls it on every router of a model); nothing by default.

`Router.__init__` builds the gate and then forks the RNG stream; a router with other
parameters drawn from `rngs` draws them before calling it (the order of the draws fixes
what a seed gives).

Class attributes read by models and configs:
  * `causal`: whether the routing of token t depends only on tokens <= t (a decoder
    refuses non-causal routers); instances may refine it (`is_causal`).
  * `needs_token_ids`: whether `token_ids` must be given (hash routers).
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.errors import ConfigError
from moe_jax.layers.moe_config import LayerContext
from moe_jax.routing import Routing
from moe_jax.routing.capacity import CAPACITY_KWARGS, CapacitySpec

Array = jax.Array

# Constructor arguments that every router takes and that are not router options.
_NOT_OPTIONS = ('self', 'd_model', 'num_experts', 'rngs', 'context')


def router_kernel_init(scale: float = 0.1):
  """Switch Transformer init (Fedus et al. §2.4): truncated normal, std sqrt(scale/fan_in).

  The paper reduces the default scale 1.0 to 0.1 for stability; flaxformer's
  normal(2e-2) is the same order of magnitude for d ~ 256-768.
  """
  return jax.nn.initializers.variance_scaling(scale, 'fan_in', 'truncated_normal')


class LinearGate(nnx.Module):
  """logits = x · W in float32, W: [d, E], no bias (Switch, V-MoE, flaxformer)."""

  def __init__(self, d_model: int, num_experts: int, *, init_scale: float = 0.1, rngs: nnx.Rngs):
    self.kernel = nnx.Param(router_kernel_init(init_scale)(rngs.params(), (d_model, num_experts),
                                                           jnp.float32))

  def __call__(self, x: Array) -> Array:
    """x: [..., d] -> logits [..., E] float32."""
    # On 2-D tokens: XLA:CPU transposes a 3-D operand in the backward pass (1.8x slower).
    kernel = self.kernel[...]
    logits = jnp.matmul(x.reshape(-1, x.shape[-1]).astype(jnp.float32), kernel,
                        precision=jax.lax.Precision.HIGHEST)
    return logits.reshape(*x.shape[:-1], kernel.shape[-1])


def check_k(k: int, num_experts: int, hint: str = '') -> int:
  """k experts per token must lie in [1, E]; returns k."""
  if not 1 <= k <= num_experts:
    raise ConfigError(f'k={k} must be between 1 and num_experts={num_experts}{hint}.',
                      field='k')
  return k


class Router(nnx.Module):
  """Base class of the router modules (see the module docstring).

  Class attributes a router sets:
    routing_fn: the pure routing function its pass-through keywords go to.
    set_by_router: keyword-only arguments of `routing_fn` the router computes itself.
    default_capacity: its `CapacitySpec` defaults, or None for a router without capacity.
    capacity_kwargs: the capacity keywords it takes (all of them by default).
  """
  causal: bool = True
  needs_token_ids: bool = False
  routing_fn = None
  set_by_router: tuple[str, ...] = ()
  default_capacity: CapacitySpec | None = None
  capacity_kwargs: tuple[str, ...] = CAPACITY_KWARGS

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs,
               context: LayerContext | None = None, kwargs: dict | None = None,
               gate_init_scale: float | None = None, noise_std: float = 0.0,
               stochastic: bool = False):
    """Checks and stores the router's options.

    Args:
      d_model, num_experts, rngs: as the router's.
      context: what the model tells the layer; routers that need more read it in their
        own constructor. The base reads `causal`: a router whose routing function takes
        `slot_order` then assigns capacity slots token by token ('token'), so that a
        later token's first choice never drops an earlier token's second choice (the
        Google codebases' 'choice' order does, which leaks future tokens in a decoder).
      kwargs: the router's `**kwargs`: capacity and pass-through keywords.
      gate_init_scale: build `self.gate`, a `LinearGate` with this init scale.
      noise_std: std of the Gaussian noise `add_noise` puts on logits in training.
      stochastic: the router draws random numbers in training (needs `self.rngs`).
    """
    kwargs = dict(kwargs or {})
    type(self).check_kwargs(kwargs, num_experts=num_experts)
    if context is not None and context.causal and 'slot_order' in type(self).passthrough_kwargs():
      if kwargs.get('slot_order', 'token') != 'token' and not context.allow_future_leak:
        raise ConfigError("slot_order='choice' lets later tokens drop earlier tokens' choices "
                          "in a decoder; leave it unset (a causal context uses 'token').",
                          field='slot_order')
      kwargs.setdefault('slot_order', 'token')
    self.num_experts = num_experts
    self.capacity = type(self).capacity_spec(kwargs)
    self.routing_kwargs = {n: v for n, v in kwargs.items() if n not in CAPACITY_KWARGS}
    self.deterministic = False
    if gate_init_scale is not None:
      self.gate = LinearGate(d_model, num_experts, init_scale=gate_init_scale, rngs=rngs)
    self.noise_std = noise_std
    self.rngs = rngs['gating'].fork() if (stochastic or noise_std) else nnx.data(None)

  # --- keywords -------------------------------------------------------------------------

  @classmethod
  def own_kwargs(cls) -> set[str]:
    """The keywords of the router's constructors (its own options): its class's and
    those of the router classes it derives from, which its `**kwargs` may reach."""
    names = set()
    for klass in cls.__mro__:
      if klass is Router or not issubclass(klass, Router) or '__init__' not in vars(klass):
        continue
      params = inspect.signature(klass.__init__).parameters
      names |= {n for n, p in params.items()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in _NOT_OPTIONS}
    return names

  @classmethod
  def passthrough_kwargs(cls) -> set[str]:
    """Keywords handed to `routing_fn` unchanged."""
    if cls.routing_fn is None:
      return set()
    params = inspect.signature(cls.routing_fn).parameters
    fn_kwargs = {n for n, p in params.items() if p.kind == p.KEYWORD_ONLY}
    return fn_kwargs - set(CAPACITY_KWARGS) - set(cls.set_by_router) - cls.own_kwargs()

  @classmethod
  def accepted_kwargs(cls) -> set[str]:
    """Every name `router_kwargs` may hold."""
    capacity = set(cls.capacity_kwargs) if cls.default_capacity is not None else set()
    return cls.own_kwargs() | capacity | cls.passthrough_kwargs()

  @classmethod
  def check_kwargs(cls, kwargs: dict, *, num_experts: int | None = None) -> None:
    """Raises ConfigError (field = the bad key) for a keyword the router does not take,
    naming the ones it does and the nearest match, or for a bad capacity value."""
    del num_experts   # the checks here do not depend on it
    allowed = sorted(cls.accepted_kwargs())
    for key in sorted(set(kwargs) - set(allowed)):
      near = difflib.get_close_matches(key, allowed, n=1)
      hint = f' Did you mean {near[0]!r}?' if near else ''
      raise ConfigError(f'{cls.__name__} takes no argument {key!r}.{hint} It takes: '
                        f'{", ".join(allowed)}.', field=key)
    cls.capacity_spec(kwargs)

  @classmethod
  def capacity_spec(cls, kwargs: dict) -> CapacitySpec | None:
    """The router's `CapacitySpec`: the capacity keywords of `kwargs` over its defaults."""
    if cls.default_capacity is None:
      return None
    given = {n: kwargs[n] for n in cls.capacity_kwargs if n in kwargs}
    return dataclasses.replace(cls.default_capacity, **given)

  # --- what subclasses call ---------------------------------------------------------------

  def slots(self, num_tokens: int, k: int = 1) -> int:
    """C, slots per expert per group of `num_tokens` tokens, in the current mode; k is
    the router's choices per token (multiplied in unless capacity_include_k=False)."""
    return self.capacity.slots(num_tokens, self.num_experts, k=k, train=not self.deterministic)

  def add_noise(self, logits: Array) -> Array:
    """Adds N(0, noise_std²) to the logits in training (V-MoE uses noise_std = 1/E)."""
    if self.deterministic or not self.noise_std:
      return logits
    return logits + self.noise_std * jax.random.normal(self.rngs(), logits.shape, logits.dtype)

  # --- what the layer and the trainer call ------------------------------------------------

  @property
  def is_causal(self) -> bool:
    return self.causal

  def token_permutation(self, num_groups: int, num_tokens: int) -> Array | None:
    """Optional [G·S] permutation of all tokens, applied before routing and undone after
    the combine (BASE's shuffle across the batch); None (default) keeps the groups."""
    return None

  def __call__(self, x: Array, *, token_ids: Array | None = None) -> Routing:
    """x: [G, S, d], token_ids: [G, S] int or None -> Routing."""
    raise NotImplementedError

  def after_step(self, rewards: Array | None = None, *, mask: Array | None = None) -> None:
    """Updates non-gradient state after the optimizer step (default: nothing).

    Args:
      rewards: [B] (or [B, S]) per-example rewards of the step, stop-gradient; None when
        the task has none.
      mask: optional 0/1 weights of the same shape (padding examples: 0).
    """

"""Router modules: own the gating parameters, call the pure routing functions.

Every router module is built as `Router(d_model, num_experts, *, rngs, **router_kwargs)`
and called as `router(x, token_ids=None) -> Routing` with `x: [G, S, d]`. Router math
runs in float32 whatever the activation dtype (Switch "selective precision").
`deterministic=True` (set by `module.eval()`) turns off noise and sampling and switches
to the evaluation capacity factor.

Class attributes read by models and configs:
  * `causal`: whether the routing of token t depends only on tokens <= t (a decoder
    refuses non-causal routers); instances may refine it (`is_causal`).
  * `needs_token_ids`: whether `token_ids` must be given (hash routers).
"""
from __future__ import annotations

import difflib
import inspect

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import routing
from moe_jax.errors import ConfigError

Array = jax.Array


def router_kernel_init(scale: float = 0.1):
  """Switch Transformer init (Fedus et al. §2.4): truncated normal, std sqrt(scale/fan_in).

  The paper reduces the default scale 1.0 to 0.1 for stability; flaxformer's
  normal(2e-2) is the same order of magnitude for d ~ 256-768.
  """
  return jax.nn.initializers.variance_scaling(scale, 'fan_in', 'truncated_normal')


def check_capacity_factors(name: str, capacity_factor, eval_capacity_factor):
  """Raises at construction, not at the first call, on a non-positive factor."""
  for label, cf in (('capacity_factor', capacity_factor),
                    ('eval_capacity_factor', eval_capacity_factor)):
    if cf is not None and not cf > 0:
      raise ValueError(f'{name}: {label} must be > 0, got {cf!r}.')


def check_routing_kwargs(router_cls, fn, kwargs: dict):
  """Rejects router_kwargs that neither the router nor `fn` takes (a typo would
  otherwise surface only at the first call, or never)."""
  def keyword_only(f):
    params = inspect.signature(f).parameters
    return {p for p in params if params[p].kind == inspect.Parameter.KEYWORD_ONLY}
  allowed = (keyword_only(router_cls.__init__) | keyword_only(fn)) - {'rngs'}
  unknown = sorted(set(kwargs) - allowed)
  if unknown:
    raise TypeError(f'{router_cls.__name__} got unknown router_kwargs {unknown}; '
                    f'valid ones: {sorted(allowed)}.')


class LinearGate(nnx.Module):
  """logits = x · W in float32, W: [d, E], no bias (Switch, V-MoE, flaxformer)."""

  def __init__(self, d_model: int, num_experts: int, *, init_scale: float = 0.1, rngs: nnx.Rngs):
    self.kernel = nnx.Param(router_kernel_init(init_scale)(rngs.params(), (d_model, num_experts),
                                                           jnp.float32))

  def __call__(self, x: Array) -> Array:
    """x: [..., d] -> logits [..., E] float32."""
    return jnp.einsum('...d,de->...e', x.astype(jnp.float32), self.kernel[...],
                      precision=jax.lax.Precision.HIGHEST)


class Router(nnx.Module):
  """Base class: evaluation mode flag, optional logit noise and the registry contract."""
  causal: bool = True
  needs_token_ids: bool = False
  # The pure routing function that receives the router's pass-through keywords
  # (`**routing_kwargs`), or None when the constructor takes no pass-through keywords.
  routing_fn = None

  @classmethod
  def accepted_kwargs(cls) -> set[str]:
    """Names `router_kwargs` may hold: the constructor's keywords (and those of
    `routing_fn` when the constructor passes keywords through)."""
    def keywords(f):
      params = inspect.signature(f).parameters
      return {n for n, p in params.items()
              if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    params = inspect.signature(cls.__init__).parameters
    names = keywords(cls.__init__) - {'self', 'd_model', 'num_experts', 'rngs', 'context'}
    if any(p.kind == p.VAR_KEYWORD for p in params.values()) and cls.routing_fn is not None:
      names |= {n for n, p in inspect.signature(cls.routing_fn).parameters.items()
                if p.kind == p.KEYWORD_ONLY}
    return names

  @classmethod
  def check_kwargs(cls, kwargs: dict, *, num_experts: int | None = None) -> None:
    """Raises ConfigError (field = the bad key) for a keyword the router does not take,
    naming the ones it does and the nearest match."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()) and cls.routing_fn is None:
      return   # pass-through keywords with no declared target: checked at construction
    allowed = cls.accepted_kwargs()
    for key in sorted(set(kwargs) - allowed):
      near = difflib.get_close_matches(key, sorted(allowed), n=1)
      hint = f' Did you mean {near[0]!r}?' if near else ''
      raise ConfigError(f'{cls.__name__} takes no argument {key!r}.{hint} It takes: '
                        f'{", ".join(sorted(allowed))}.', field=key)

  @property
  def is_causal(self) -> bool:
    return self.causal

  def token_permutation(self, num_groups: int, num_tokens: int) -> Array | None:
    """Optional [G·S] permutation of all tokens, applied before routing and undone after
    the combine (BASE's shuffle across the batch); None (default) keeps the groups."""
    return None

  def _init_noise(self, noise_std: float, rngs: nnx.Rngs):
    self.noise_std = noise_std
    self.deterministic = False
    self.rngs = rngs['gating'].fork() if noise_std else nnx.data(None)

  def _noisy(self, logits: Array) -> Array:
    """Adds N(0, noise_std²) to the logits in training (V-MoE uses noise_std = 1/E)."""
    if self.deterministic or not self.noise_std:
      return logits
    return logits + self.noise_std * jax.random.normal(self.rngs(), logits.shape, logits.dtype)


class TokensChoiceRouter(Router):
  """Softmax top-k token choice (`routing.tokens_choice`) behind a linear gate.

  router_kwargs: `k`, `capacity_factor`, `eval_capacity_factor` (Switch/ST-MoE use 2.0
  at evaluation; default: same as training), `noise_std`, `init_scale`, and every
  other keyword of `routing.tokens_choice` (batch_priority, renormalize, loss weights,
  capacity convention).
  """
  routing_fn = staticmethod(routing.tokens_choice)

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs, k: int = 1,
               capacity_factor: float = 1.25, eval_capacity_factor: float | None = None,
               noise_std: float = 0.0, init_scale: float = 0.1, **routing_kwargs):
    if not 1 <= k <= num_experts:
      raise ValueError(f'k={k} must be between 1 and num_experts={num_experts}.')
    check_capacity_factors('tokens_choice', capacity_factor, eval_capacity_factor)
    check_routing_kwargs(type(self), routing.tokens_choice, routing_kwargs)
    self.gate = LinearGate(d_model, num_experts, init_scale=init_scale, rngs=rngs)
    self.k, self.capacity_factor = k, capacity_factor
    self.eval_capacity_factor = (capacity_factor if eval_capacity_factor is None
                                 else eval_capacity_factor)
    self.routing_kwargs = dict(routing_kwargs)
    self._init_noise(noise_std, rngs)

  @property
  def is_causal(self) -> bool:
    return not self.routing_kwargs.get('batch_priority', False)

  def __call__(self, x: Array, *, token_ids: Array | None = None) -> routing.Routing:
    logits = self._noisy(self.gate(x))
    cf = self.eval_capacity_factor if self.deterministic else self.capacity_factor
    return routing.tokens_choice(logits, k=self.k, capacity_factor=cf, **self.routing_kwargs)


class ExpertsChoiceRouter(Router):
  """Expert choice (`routing.experts_choice`) behind a linear gate. Not causal.

  router_kwargs: `capacity_factor` (default 2.0, the paper's EC-CF2),
  `eval_capacity_factor`, `noise_std`, `init_scale`, and the keywords of
  `routing.experts_choice`.
  """
  routing_fn = staticmethod(routing.experts_choice)
  causal = False

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs,
               capacity_factor: float = 2.0, eval_capacity_factor: float | None = None,
               noise_std: float = 0.0, init_scale: float = 0.1, **routing_kwargs):
    check_capacity_factors('experts_choice', capacity_factor, eval_capacity_factor)
    check_routing_kwargs(type(self), routing.experts_choice, routing_kwargs)
    self.gate = LinearGate(d_model, num_experts, init_scale=init_scale, rngs=rngs)
    self.capacity_factor = capacity_factor
    self.eval_capacity_factor = (capacity_factor if eval_capacity_factor is None
                                 else eval_capacity_factor)
    self.routing_kwargs = dict(routing_kwargs)
    self._init_noise(noise_std, rngs)

  def __call__(self, x: Array, *, token_ids: Array | None = None) -> routing.Routing:
    logits = self._noisy(self.gate(x))
    cf = self.eval_capacity_factor if self.deterministic else self.capacity_factor
    return routing.experts_choice(logits, capacity_factor=cf, **self.routing_kwargs)


def l2_normalize(x: Array, axis: int, eps: float = 1e-6) -> Array:
  """x / sqrt(Σ x² + eps) along `axis` (eps inside the root, as in vmoe)."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


class SoftMoeRouter(Router):
  """Soft MoE router (Puigcerver et al. 2023, Algorithm 2).

  Params: `phi` Φ [d, E, P] (LeCun normal), `scale` (scalar, init 1).
  logits[g, m, n, p] = scale · <x̂[g, m], Φ̂[:, n, p]> with x̂ the l2-normalised tokens and
  Φ̂ the l2-normalised columns of Φ (paper App. E: without it the softmaxes collapse to
  one-hot as d grows). The experts then mix the un-normalised tokens.

  router_kwargs:
    num_slots: P, slots per expert (paper default 1).
    capacity_factor + num_tokens: alternatively P = round(capacity_factor · S / E), with
      S = num_tokens per group, as vmoe does when num_slots is None.
    normalize: l2-normalise x and Φ with the learned scale (default True; False gives
      plain logits x · Φ).
    noise_std: Gaussian noise on the logits in training (vmoe default 0).
  """
  causal = False

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs, num_slots: int | None = 1,
               capacity_factor: float | None = None, num_tokens: int | None = None,
               normalize: bool = True, noise_std: float = 0.0):
    if capacity_factor is not None:
      if num_tokens is None:
        raise ValueError('soft_moe with capacity_factor needs num_tokens (tokens per group) '
                         'to size Φ; or pass num_slots instead.')
      # vmoe: round(cf·S/E), and an error (not a silent 1) when that is 0.
      num_slots = int(round(capacity_factor * num_tokens / num_experts))
      if num_slots < 1:
        raise ValueError(f'soft_moe: capacity_factor={capacity_factor} with '
                         f'num_tokens={num_tokens} and {num_experts} experts gives '
                         'round(cf·S/E) = 0 slots per expert; raise capacity_factor or pass '
                         'num_slots.')
    if not num_slots or num_slots < 1:
      raise ValueError(f'soft_moe needs num_slots >= 1 or a capacity_factor, got {num_slots!r}.')
    self.num_experts, self.num_slots, self.normalize = num_experts, num_slots, normalize
    init = jax.nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    self.phi = nnx.Param(init(rngs.params(), (d_model, num_experts, num_slots), jnp.float32))
    self.scale = nnx.Param(jnp.ones((), jnp.float32))
    self._init_noise(noise_std, rngs)

  def logits(self, x: Array) -> Array:
    """x: [G, S, d] -> [G, S, E, P] float32."""
    x = x.astype(jnp.float32)
    phi = self.phi[...]
    if self.normalize:
      x = l2_normalize(x, axis=-1)
      phi = self.scale[...] * l2_normalize(phi, axis=0)
    logits = jnp.einsum('gsd,dnp->gsnp', x, phi, precision=jax.lax.Precision.HIGHEST)
    return self._noisy(logits)

  def __call__(self, x: Array, *, token_ids: Array | None = None) -> routing.Routing:
    return routing.soft_moe(self.logits(x))

"""`SinkhornBaseRouter`: S-BASE (Clark et al. 2022), registry name 'sinkhorn_base'.

A linear router (Switch init, float32 logits) whose training-time top-1 comes from the
Sinkhorn transport plan of its logits (`routing.sinkhorn`), no gradient through the
plan; greedy top-1 at evaluation. Gate σ(logit) by default (BASE's gate; the paper
text was not available to check, Megatron's S-BASE-style router uses σ for top-1), or
the softmax probability with `gate='softmax'`. No aux loss. Not causal.
"""
from __future__ import annotations

import jax
from flax import nnx

from moe_jax.layers.routers import LinearGate, Router
from moe_jax.routing import sinkhorn
from moe_jax.routing.types import Routing

Array = jax.Array


class SinkhornBaseRouter(Router):
  """S-BASE router.

  router_kwargs:
    gate: 'sigmoid' (default) or 'softmax'.
    temperature: τ of exp(logits / τ) (default 1.0).
    num_iters: fixed Sinkhorn iteration count, or None (default) for tolerance mode:
      stop when every row sum is within `tol` (default 1e-3) of 1, at most `max_iters`
      (default 100).
    capacity_factor: None (default) = no drops (C = S); else C = ceil(S·cf/E), overflow
      dropped in token order. `eval_capacity_factor` likewise (default: capacity_factor).
    noise_std, init_scale: as for `TokensChoiceRouter`.
  """
  causal = False

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs, gate: str = 'sigmoid',
               temperature: float = 1.0, num_iters: int | None = None, tol: float = 1e-3,
               max_iters: int = 100, capacity_factor: float | None = None,
               eval_capacity_factor: float | None = None, noise_std: float = 0.0,
               init_scale: float = 0.1):
    if gate not in sinkhorn.GATES:
      raise ValueError(f'gate must be one of {sinkhorn.GATES}, got {gate!r}.')
    if temperature <= 0:
      raise ValueError(f'temperature must be > 0, got {temperature}.')
    self.gate = LinearGate(d_model, num_experts, init_scale=init_scale, rngs=rngs)
    self.gate_kind = gate
    self.sinkhorn_kwargs = dict(temperature=temperature, num_iters=num_iters, tol=tol,
                                max_iters=max_iters)
    self.capacity_factor = capacity_factor
    self.eval_capacity_factor = eval_capacity_factor if eval_capacity_factor is not None else capacity_factor
    self._init_noise(noise_std, rngs)

  def __call__(self, x: Array, *, token_ids: Array | None = None) -> Routing:
    logits = self._noisy(self.gate(x))
    cf = self.eval_capacity_factor if self.deterministic else self.capacity_factor
    return sinkhorn.sinkhorn_base(logits, train=not self.deterministic, gate=self.gate_kind,
                                  capacity_factor=cf, **self.sinkhorn_kwargs)

"""Soft MoE router (Puigcerver et al. 2023, Algorithm 2); math in `routing/soft.py`;
registry name 'soft_moe'."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import routing
from moe_jax.layers.moe_config import LayerContext
from moe_jax.layers.routers.base import Router

Array = jax.Array


def l2_normalize(x: Array, axis: int, eps: float = 1e-6) -> Array:
  """x / sqrt(Σ x² + eps) along `axis` (eps inside the root, as in vmoe)."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


class SoftMoeRouter(Router):
  """Soft MoE router.

  Params: `phi` Φ [d, E, P] (LeCun normal), `scale` (scalar, init 1).
  logits[g, m, n, p] = scale · <x̂[g, m], Φ̂[:, n, p]> with x̂ the l2-normalised tokens and
  Φ̂ the l2-normalised columns of Φ (paper App. E: without it the softmaxes collapse to
  one-hot as d grows). The experts then mix the un-normalised tokens.

  router_kwargs:
    num_slots: P, slots per expert (paper default 1).
    capacity_factor: alternatively P = round(capacity_factor · S / E), as vmoe does when
      num_slots is None, with S = `context.tokens_per_group` (the model passes it).
    normalize: l2-normalise x and Φ with the learned scale (default True; False gives
      plain logits x · Φ).
    noise_std: Gaussian noise on the logits in training (vmoe default 0).
  """
  causal = False

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs,
               context: LayerContext | None = None, num_slots: int | None = 1,
               capacity_factor: float | None = None, normalize: bool = True,
               noise_std: float = 0.0, **kwargs):
    if capacity_factor is not None:
      num_tokens = (context or LayerContext()).tokens_per_group
      if num_tokens is None:
        raise ValueError('soft_moe with capacity_factor sizes Φ from the tokens per group: '
                         'build it with context=LayerContext(tokens_per_group=S) (models '
                         'pass it), or pass num_slots instead.')
      # vmoe: round(cf·S/E), and an error (not a silent 1) when that is 0.
      num_slots = int(round(capacity_factor * num_tokens / num_experts))
      if num_slots < 1:
        raise ValueError(f'soft_moe: capacity_factor={capacity_factor} with '
                         f'{num_tokens} tokens per group and {num_experts} experts gives '
                         'round(cf·S/E) = 0 slots per expert; raise capacity_factor or pass '
                         'num_slots.')
    if not num_slots or num_slots < 1:
      raise ValueError(f'soft_moe needs num_slots >= 1 or a capacity_factor, got {num_slots!r}.')
    self.num_slots, self.normalize = num_slots, normalize
    init = jax.nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    self.phi = nnx.Param(init(rngs.params(), (d_model, num_experts, num_slots), jnp.float32))
    self.scale = nnx.Param(jnp.ones((), jnp.float32))
    super().__init__(d_model, num_experts, rngs=rngs, context=context, kwargs=kwargs,
                     noise_std=noise_std)

  def logits(self, x: Array) -> Array:
    """x: [G, S, d] -> [G, S, E, P] float32."""
    g, s, d = x.shape
    _, e, p = self.phi.shape
    # On 2-D views (tokens [G·S, d], Φ [d, E·P]): XLA:CPU transposes 3-D / 4-D operands
    # of a matmul's backward pass, and runs ops on arrays with a trailing axis of size
    # P = 1 several times slower.
    x = x.reshape(g * s, d).astype(jnp.float32)
    phi = self.phi[...].reshape(d, e * p)
    if self.normalize:
      x = l2_normalize(x, axis=-1)
      phi = self.scale[...] * l2_normalize(phi, axis=0)
    logits = jnp.matmul(x, phi, precision=jax.lax.Precision.HIGHEST)
    return self.add_noise(logits.reshape(g, s, e, p))

  def __call__(self, x: Array, *, token_ids: Array | None = None) -> routing.Routing:
    return routing.soft_moe(self.logits(x))

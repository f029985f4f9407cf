"""REINFORCE router module ("RL-R", Clark et al. 2022); math and the trainer contract
in `routing/reinforce.py`; registry name 'reinforce'.

Trainer wiring (what `layers.score_function_loss` and `layers.after_step` do):

    y, aux = model(x)                                # every MoeLayer's aux
    rewards = -jax.lax.stop_gradient(per_example_loss)          # [B]
    loss += layers.score_function_loss(aux, rewards)  # Σ of the REINFORCE surrogates
    ... optimizer.update(model, grads), then in the same jitted step:
    layers.after_step(model, rewards)                 # moves every router's baseline
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.moe_config import LayerContext
from moe_jax.layers.routers.base import Router, check_k
from moe_jax.routing import CapacitySpec
from moe_jax.routing import reinforce as reinforce_lib

Array = jax.Array


class RewardBaseline(nnx.Variable):
  """Non-trainable state of the REINFORCE baseline (not an `nnx.Param`)."""


class ReinforceRouter(Router):
  """Token choice by sampling from π = softmax(x·W) in training, argmax at evaluation.

  Params: `gate.kernel` [d, E] (Switch init). State: `baseline` (scalar float32, the
  moving-average reward) and `baseline_count` (int32), both `RewardBaseline`, moved by
  `after_step(rewards)` after the optimizer step.

  router_kwargs:
    k: experts per token (default 1, as RL-R).
    capacity keywords: as token choice (capacity_factor 1.25; eval: as training).
    gate: 'prob' (expert outputs weighted by π_e; default) or 'one'.
    load_balance_weight: Switch balancing loss on π (default 1e-2).
    entropy_weight: entropy bonus β (default 0).
    baseline_decay: β of the baseline moving average (default 0.99).
    init_scale: gate init scale; z_loss_weight of `reinforce_routing`.
  Metrics: `reinforce_log_prob` [G, S] (differentiable) and `reinforce_baseline`.
  Causal: yes (each token samples from its own π).
  """
  routing_fn = staticmethod(reinforce_lib.reinforce_routing)
  default_capacity = CapacitySpec(capacity_factor=1.25)
  causal = True

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs,
               context: LayerContext | None = None, k: int = 1, baseline_decay: float = 0.99,
               init_scale: float = 0.1, **kwargs):
    self.k = check_k(k, num_experts)
    if not 0.0 <= baseline_decay < 1.0:
      raise ValueError(f'baseline_decay must be in [0, 1), got {baseline_decay}.')
    super().__init__(d_model, num_experts, rngs=rngs, context=context, kwargs=kwargs,
                     gate_init_scale=init_scale, stochastic=True)
    self.baseline_decay = baseline_decay
    self.baseline = RewardBaseline(jnp.zeros((), jnp.float32))
    self.baseline_count = RewardBaseline(jnp.zeros((), jnp.int32))

  def __call__(self, x: Array, *, token_ids: Array | None = None):
    key = None if self.deterministic else self.rngs()
    r = reinforce_lib.reinforce_routing(self.gate(x), key, k=self.k,
                                        capacity=self.slots(x.shape[1], self.k),
                                        **self.routing_kwargs)
    metrics = dict(r.metrics)
    metrics[reinforce_lib.BASELINE_KEY] = jax.lax.stop_gradient(self.baseline[...])
    return r.replace(metrics=metrics)

  def after_step(self, rewards: Array | None = None, *, mask: Array | None = None) -> None:
    """Moves the baseline towards mean(rewards) (see `routing.reinforce.update_baseline`)."""
    if rewards is None:
      raise ValueError('the reinforce router needs the step\'s rewards: call '
                       'layers.after_step(model, rewards) with the per-example rewards.')
    b, n = reinforce_lib.update_baseline(self.baseline[...], self.baseline_count[...], rewards,
                                         decay=self.baseline_decay, mask=mask)
    self.baseline[...] = b
    self.baseline_count[...] = n

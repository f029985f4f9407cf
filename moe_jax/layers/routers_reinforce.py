"""REINFORCE router module ("RL-R", Clark et al. 2022); math and the trainer contract
in `routing/reinforce.py`.

Trainer wiring (trainer-independent helpers live here and in `routing.reinforce`):

    y, aux = model(x)                                     # every MoeLayer's aux
    rewards = -jax.lax.stop_gradient(per_token_loss)      # [B, S] (or [B] per example)
    for m in moe_metrics:                                 # each layer's aux['metrics']
      if 'reinforce_log_prob' in m:
        loss += reinforce_surrogate(m['reinforce_log_prob'].reshape(B, -1), rewards,
                                    m['reinforce_baseline'])
    ... after the gradient step, in the same jitted step:
    update_reinforce_baselines(model, rewards)            # moves every router's baseline
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.routers import LinearGate, Router
from moe_jax.routing import reinforce as reinforce_lib

Array = jax.Array


class RewardBaseline(nnx.Variable):
  """Non-trainable state of the REINFORCE baseline (not an `nnx.Param`)."""


class ReinforceRouter(Router):
  """Token choice by sampling from π = softmax(x·W) in training, argmax at evaluation.

  Params: `gate.kernel` [d, E] (Switch init). State: `baseline` (scalar float32, the
  moving-average reward) and `baseline_count` (int32), both `RewardBaseline`.

  router_kwargs:
    k: experts per token (default 1, as RL-R).
    capacity_factor / eval_capacity_factor: as token choice (1.25 / same).
    gate: 'prob' (expert outputs weighted by π_e; default) or 'one'.
    load_balance_weight: Switch balancing loss on π (default 1e-2).
    entropy_weight: entropy bonus β (default 0).
    baseline_decay: β of the baseline moving average (default 0.99).
    init_scale: gate init scale; plus the capacity keywords of `reinforce_routing`.
  Metrics: `reinforce_log_prob` [G, S] (differentiable) and `reinforce_baseline`.
  Causal: yes (each token samples from its own π).
  """
  routing_fn = staticmethod(reinforce_lib.reinforce_routing)
  causal = True

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs, k: int = 1,
               capacity_factor: float = 1.25, eval_capacity_factor: float | None = None,
               baseline_decay: float = 0.99, init_scale: float = 0.1, **routing_kwargs):
    if not 1 <= k <= num_experts:
      raise ValueError(f'k={k} must be between 1 and num_experts={num_experts}.')
    if not 0.0 <= baseline_decay < 1.0:
      raise ValueError(f'baseline_decay must be in [0, 1), got {baseline_decay}.')
    self.gate = LinearGate(d_model, num_experts, init_scale=init_scale, rngs=rngs)
    self.k, self.capacity_factor = k, capacity_factor
    self.eval_capacity_factor = eval_capacity_factor or capacity_factor
    self.baseline_decay = baseline_decay
    self.routing_kwargs = dict(routing_kwargs)
    self.baseline = RewardBaseline(jnp.zeros((), jnp.float32))
    self.baseline_count = RewardBaseline(jnp.zeros((), jnp.int32))
    self.deterministic = False
    self.rngs = rngs['gating'].fork()

  def __call__(self, x: Array, *, token_ids: Array | None = None):
    logits = self.gate(x)
    key = None if self.deterministic else self.rngs()
    cf = self.eval_capacity_factor if self.deterministic else self.capacity_factor
    r = reinforce_lib.reinforce_routing(logits, key, k=self.k, capacity_factor=cf,
                                        **self.routing_kwargs)
    metrics = dict(r.metrics)
    metrics[reinforce_lib.BASELINE_KEY] = jax.lax.stop_gradient(self.baseline[...])
    return r.replace(metrics=metrics)

  def update_baseline(self, rewards: Array, mask: Array | None = None):
    """Moves the baseline towards mean(rewards) (see `routing.reinforce.update_baseline`)."""
    b, n = reinforce_lib.update_baseline(self.baseline[...], self.baseline_count[...], rewards,
                                         decay=self.baseline_decay, mask=mask)
    self.baseline[...] = b
    self.baseline_count[...] = n


def update_reinforce_baselines(model: nnx.Module, rewards: Array,
                               mask: Array | None = None) -> int:
  """Updates the baseline of every `ReinforceRouter` inside `model`; returns how many."""
  routers = [m for _, m in nnx.iter_graph(model) if isinstance(m, ReinforceRouter)]
  for router in routers:
    router.update_baseline(rewards, mask)
  return len(routers)

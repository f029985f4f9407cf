"""What a trainer calls for the routers of any model, without naming one.

    logits, aux = model(batch)                        # aux: {layer: {'losses', 'metrics'}}
    rewards = -jax.lax.stop_gradient(per_example_loss)            # [B]
    loss = task_loss + aux_losses + layers.score_function_loss(aux, rewards)
    ... grads, optimizer.update(model, grads), then in the same jitted step:
    layers.after_step(model, rewards)

`score_function_loss` adds the REINFORCE surrogate of every layer whose router samples
its routing (a score-function estimator of the router's gradient); `after_step` lets
every router update its non-gradient state after the optimizer step (the REINFORCE
reward baseline, DeepSeek's expert bias).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.routers.base import Router
from moe_jax.routing import reinforce as reinforce_lib

Array = jax.Array


def score_function_loss(aux: dict, rewards: Array) -> Array:
  """Σ over score-function MoE layers of `routing.reinforce_surrogate`.

  Args:
    aux: the model's {layer name: {'losses', 'metrics'}}; a layer takes part when its
      metrics hold `reinforce_log_prob` [G, S'] (G·S' = B·S tokens in example order) and
      `reinforce_baseline` (scalar).
    rewards: [B] per-example rewards (stop-gradient), broadcast to the example's tokens.

  Returns:
    Scalar (0 when no layer takes part).
  """
  total = jnp.zeros((), jnp.float32)
  for a in aux.values():
    m = a['metrics']
    if reinforce_lib.LOG_PROB_KEY in m:
      log_prob = m[reinforce_lib.LOG_PROB_KEY].reshape(rewards.shape[0], -1)   # [B, S]
      total = total + reinforce_lib.reinforce_surrogate(log_prob, rewards,
                                                        m[reinforce_lib.BASELINE_KEY])
  return total


def after_step(model: nnx.Module, rewards: Array | None = None, *,
               mask: Array | None = None) -> int:
  """Calls `after_step(rewards, mask=mask)` on every `Router` inside `model`.

  Call it after the optimizer update, inside the jitted step (the state it changes is
  part of the model's state). Returns the number of routers visited.

  Args:
    model: any NNX module (a model, a layer, a router).
    rewards: [B] (or [B, S]) the step's per-example rewards, stop-gradient; None when the
      task has none (routers that need them then raise).
    mask: optional weights of the rewards' shape (0 for padding examples).
  """
  routers = [m for _, m in nnx.iter_graph(model) if isinstance(m, Router)]
  for router in routers:
    router.after_step(rewards, mask=mask)
  return len(routers)

"""What the trainer calls on the MoE layers of any model, without naming a router.

    total = task_loss + aux_losses + score_function_loss(aux, rewards)   # in the loss
    ... optimizer.update(model, grads)
    after_step(model, rewards)                                           # in the same jit
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.routers_reinforce import ReinforceRouter
from moe_jax.routing import reinforce as reinforce_lib

Array = jax.Array


def score_function_loss(aux: dict, rewards: Array) -> Array:
  """Σ over score-function MoE layers of `routing.reinforce_surrogate`.

  Args:
    aux: the model's {layer: {'losses', 'metrics'}}; a layer takes part when its metrics
      hold `reinforce_log_prob` [G, S'] (G·S' = B·S tokens in example order) and
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


def after_step(model: nnx.Module, rewards: Array) -> None:
  """Updates the non-gradient state of every router in `model` after the optimizer step."""
  for _, m in nnx.iter_graph(model):
    if isinstance(m, ReinforceRouter):
      m.update_baseline(rewards)

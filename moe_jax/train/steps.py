"""The jitted train step and eval step, for any task and model.

    train_step = make_train_step(model, optimizer, schedule, task)
    state = nnx.state((model, optimizer))
    state, metrics = train_step(state, batch)

The loss is the task's loss plus every MoE layer's auxiliary losses plus the
score-function surrogates of REINFORCE-style routers (`layers.score_function_loss`,
rewards = -(each example's task loss)). The step differentiates only `nnx.Param`. Any
other `nnx.Variable` a layer changes in its forward pass (RNG counters, moving
averages) is carried out of the step like BatchNorm statistics; after the optimizer
update `layers.after_step` lets every router update its non-gradient state (REINFORCE
baseline, DeepSeek bias).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe_jax import layers
from moe_jax.inspection import views as routing_views_lib

Array = jax.Array


def aux_loss_terms(aux: dict) -> dict[str, Array]:
  """{'<layer>/<loss name>': weighted scalar} over every MoE layer's aux losses."""
  return {f'{layer}/{name}': v for layer, a in aux.items() for name, v in a['losses'].items()}


def loss_terms(task_loss: Array, per_example: Array, aux: dict) -> tuple[Array, dict]:
  """Total loss = task loss + every MoE layer's auxiliary losses + REINFORCE surrogates.

  Args:
    task_loss: scalar, the task's training loss.
    per_example: [B] each example's task loss (rewards are its negation, stop-gradient).
    aux: {layer name: {'losses': {name: scalar}, 'metrics': {...}}} from the model.

  Returns:
    (total, terms) with terms 'task_loss', 'aux_loss' (sum), 'aux_losses'
    {'layer/name': scalar}, 'rewards' [B] and 'reinforce_loss' (0 without
    score-function routers).
  """
  aux_losses = aux_loss_terms(aux)
  aux_total = sum(aux_losses.values(), jnp.zeros((), jnp.float32))
  rewards = -jax.lax.stop_gradient(per_example)
  surrogate = layers.score_function_loss(aux, rewards)
  return task_loss + aux_total + surrogate, dict(
      task_loss=task_loss, aux_loss=aux_total, aux_losses=aux_losses, rewards=rewards,
      reinforce_loss=surrogate)


def routing_scalars(aux: dict) -> dict[str, Array]:
  """Per-MoE-layer routing metrics as scalars, 'routing/<layer>/<name>'.

  Vectors over experts (expert_load) become their max and min relative to the uniform
  load 1/E (1 = balanced) and their coefficient of variation; other arrays are averaged.
  """
  out = {}
  for layer, a in aux.items():
    for name, v in a['metrics'].items():
      v = jnp.asarray(v, jnp.float32)
      key = f'routing/{layer}/{name}'
      if name == 'expert_load' and v.ndim == 1:
        e = v.shape[0]
        out[key + '_max'] = jnp.max(v) * e
        out[key + '_min'] = jnp.min(v) * e
        out[key + '_cv'] = jnp.std(v) / jnp.maximum(jnp.mean(v), 1e-9)
      else:
        out[key] = jnp.mean(v)
    for name, v in a['losses'].items():
      out[f'routing/{layer}/{name}_weighted'] = jnp.asarray(v, jnp.float32)
  return out


def routing_vectors(aux: dict) -> dict[str, Array]:
  """Each MoE layer's full load vector, 'routing/<layer>/expert_load' [E] (sums to 1).

  The trainer logs them as TensorBoard histograms and lists in metrics.jsonl; the
  scalars of `routing_scalars` are their max, min and CV.
  """
  return {f'routing/{layer}/expert_load': jnp.asarray(a['metrics']['expert_load'], jnp.float32)
          for layer, a in aux.items()
          if jnp.ndim(a['metrics'].get('expert_load', 0.0)) == 1}


def make_train_step(model: nnx.Module, optimizer: nnx.Optimizer, schedule: Callable, task, *,
                    donate: bool = True, skip_nonfinite: bool = False):
  """Returns jitted `(state, batch) -> (state, metrics)` for state = nnx.state((model, optimizer)).

  `model` is put in training mode; the graph structure is captured once here. The
  metrics hold `nonfinite` (1.0 when the loss or the gradient norm is not finite);
  `skip_nonfinite=True` then returns the input state unchanged (no update, no router
  state change), so one bad batch does not poison the weights.
  """
  model.train()
  graphdef = nnx.graphdef((model, optimizer))

  def train_step(state, batch):
    old_leaves = jax.tree.leaves(state)     # arrays: the merge below shares its Variables
    model, optimizer = nnx.merge(graphdef, state)
    model_def, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
      m = nnx.merge(model_def, params, rest, copy=True)   # fresh Variables inside the grad trace
      logits, aux = m(**task.model_inputs(batch))
      task_loss, per_example, task_metrics = task.loss(logits, batch)
      total, terms = loss_terms(task_loss, per_example, aux)
      terms['task_metrics'] = task_metrics
      # Non-Param variables mutated in the forward pass leave the step through `aux`.
      return total, (terms, aux, nnx.state(m, nnx.Not(nnx.Param)))

    (loss, (terms, aux, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    nnx.update(model, new_rest)
    lr = schedule(optimizer.step[...])
    optimizer.update(model, grads)
    layers.after_step(model, terms['rewards'])   # after the surrogate used the old state
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics = dict(loss=loss, task_loss=terms['task_loss'], aux_loss=terms['aux_loss'],
                   reinforce_loss=terms['reinforce_loss'], grad_norm=grad_norm,
                   learning_rate=lr, nonfinite=1.0 - finite.astype(jnp.float32),
                   **terms['task_metrics'])
    metrics.update(routing_scalars(aux))
    metrics.update(routing_vectors(aux))
    new_state = nnx.state((model, optimizer))
    if skip_nonfinite:
      leaves, treedef = jax.tree.flatten(new_state)
      new_state = jax.tree.unflatten(treedef, [jnp.where(finite, new, old)
                                               for new, old in zip(leaves, old_leaves)])
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=(0,) if donate else ())


def make_eval_step(model: nnx.Module, task, *, picture_examples: int = 0):
  """Returns jitted `(model_state, batch) -> sums` in eval mode (calls `model.eval()`).

  The task's sums plus each routing scalar and load vector times the batch's 'weight',
  so that their sum over batches divided by the total weight is the weighted mean.
  With `picture_examples` > 0 the output also holds 'routing_views': every MoE layer's
  `inspection.views.token_view` of the batch's first examples (for the routing
  pictures; not a sum), {} under expert parallelism.
  """
  model.eval()
  graphdef = nnx.graphdef(model)

  def eval_step(model_state, batch):
    m = nnx.merge(graphdef, model_state)
    with layers.recording_routings() as records:
      logits, aux = m(**task.model_inputs(batch))
    out = task.eval_sums(logits, batch)
    routing = {**routing_scalars(aux), **routing_vectors(aux)}
    out.update({k: v * out['weight'] for k, v in routing.items()})
    if picture_examples:
      out['routing_views'] = routing_views_lib.token_views(records, picture_examples)
    return out

  return jax.jit(eval_step)

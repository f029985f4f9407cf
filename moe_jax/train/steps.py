"""The loss, the jitted train step and the eval step.

    train_step = make_train_step(model, optimizer, schedule, label_smoothing=0.)
    state = nnx.state((model, optimizer))
    state, metrics = train_step(state, batch)     # batch: image [B, H, W, C], label [B]

The step differentiates only `nnx.Param`. Any other `nnx.Variable` a layer changes in
its forward pass (RNG counters, a router bias updated from the batch load, moving
averages) is carried out of the step like BatchNorm statistics.

Score-function routers (`reinforce`) report `reinforce_log_prob` [G, S] in their metrics;
the loss adds their REINFORCE surrogate with reward = -(the example's task loss),
broadcast to its tokens (`layers.score_function_loss`), and after the optimizer update
the step calls `layers.after_step`, which moves each router's non-Param state (the
REINFORCE baseline, DeepSeek's bias).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe_jax import layers

Array = jax.Array


def loss_terms(logits: Array, labels: Array, aux: dict, *,
               label_smoothing: float = 0.0) -> tuple[Array, dict]:
  """Total loss = mean task loss + every MoE layer's auxiliary losses + REINFORCE surrogates.

  Args:
    logits: [B, classes] float32.
    labels: [B] int.
    aux: {layer name: {'losses': {name: scalar}, 'metrics': {...}}} from the model.
    label_smoothing: ε of label smoothing (0: plain cross-entropy).

  Returns:
    (total, terms) with terms['per_example_loss'] [B] (the task loss of each example),
    'rewards' [B] (its negation, stop-gradient), 'task_loss', 'aux_loss', 'aux_losses'
    {'layer/name': scalar} and 'reinforce_loss' (sum of the surrogates; 0 without
    score-function routers).
  """
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  per_example = optax.softmax_cross_entropy(logits, targets)
  task = jnp.mean(per_example)
  aux_losses = {f'{layer}/{name}': v for layer, a in aux.items() for name, v in a['losses'].items()}
  aux_total = sum(aux_losses.values(), jnp.zeros((), jnp.float32))
  rewards = -jax.lax.stop_gradient(per_example)
  surrogate = layers.score_function_loss(aux, rewards)
  return task + aux_total + surrogate, dict(
      per_example_loss=per_example, rewards=rewards, task_loss=task, aux_loss=aux_total,
      aux_losses=aux_losses, reinforce_loss=surrogate)


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


def make_train_step(model: nnx.Module, optimizer: nnx.Optimizer, schedule: Callable, *,
                    label_smoothing: float = 0.0, donate: bool = True):
  """Returns jitted `(state, batch) -> (state, metrics)` for state = nnx.state((model, optimizer)).

  `model` is put in training mode; the graph structure is captured once here.
  """
  model.train()
  graphdef = nnx.graphdef((model, optimizer))

  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    model_def, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
      m = nnx.merge(model_def, params, rest, copy=True)   # fresh Variables inside the grad trace
      logits, aux = m(batch['image'])
      total, terms = loss_terms(logits, batch['label'], aux, label_smoothing=label_smoothing)
      # Non-Param variables mutated in the forward pass leave the step through `aux`.
      return total, (terms, logits, aux, nnx.state(m, nnx.Not(nnx.Param)))

    (loss, (terms, logits, aux, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    nnx.update(model, new_rest)
    lr = schedule(optimizer.step[...])
    optimizer.update(model, grads)
    # Router state after the optimizer step (REINFORCE baseline, DeepSeek bias), after
    # the surrogate used the old baseline.
    layers.after_step(model, terms['rewards'])
    metrics = dict(loss=loss, task_loss=terms['task_loss'], aux_loss=terms['aux_loss'],
                   reinforce_loss=terms['reinforce_loss'],
                   accuracy=jnp.mean(jnp.argmax(logits, -1) == batch['label']),
                   grad_norm=optax.tree.norm(grads), learning_rate=lr)
    metrics.update(routing_scalars(aux))
    return nnx.state((model, optimizer)), metrics

  return jax.jit(train_step, donate_argnums=(0,) if donate else ())


def make_eval_step(model: nnx.Module):
  """Returns jitted `(model_state, batch) -> sums` (loss_sum, correct, count) in eval mode.

  batch['mask'] [B] marks real examples (0 on padding). Calls `model.eval()`.
  """
  model.eval()
  graphdef = nnx.graphdef(model)

  def eval_step(model_state, batch):
    m = nnx.merge(graphdef, model_state)
    logits, aux = m(batch['image'])
    mask = batch['mask']
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    out = dict(loss_sum=jnp.sum(per_example * mask), correct=jnp.sum(correct * mask),
               count=jnp.sum(mask))
    out.update({k: v * jnp.sum(mask) for k, v in routing_scalars(aux).items()})
    return out

  return jax.jit(eval_step)

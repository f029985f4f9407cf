"""Model and optimizer from a config.

    model = build_model(config, rngs=nnx.Rngs(config.seed))   # MODELS[config.model.name]
    tx, schedule = build_optimizer(config)
"""
from __future__ import annotations

import jax
import ml_collections
import optax
from flax import nnx

from moe_jax.train import config_lib


def build_model(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
  """The model `config.model` names, built from its other fields (see `config_lib.build_model`)."""
  return config_lib.build_model(config.model, rngs=rngs)


def build_optimizer(config: ml_collections.ConfigDict):
  """AdamW with linear warmup, cosine decay to end_lr_fraction · lr, global-norm clipping.

  Returns:
    (tx, schedule): the optax transformation and the step -> learning-rate function.
  """
  o = config.optimizer
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.learning_rate, warmup_steps=o.warmup_steps,
      decay_steps=config.num_train_steps, end_value=o.learning_rate * o.end_lr_fraction)
  # Decay matrices only, not biases, norms and scalars (ViT / big_vision practice).
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask)
  if o.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx, schedule

"""Model and optimizer from a config.

    model = build_model(config, rngs=nnx.Rngs(config.seed))
    tx, schedule = build_optimizer(config)
"""
from __future__ import annotations

import jax
import ml_collections
import optax
from flax import nnx

from moe_jax.data.images import PIXEL_RANGE
from moe_jax.models import ViT


def moe_kwargs(moe: ml_collections.ConfigDict) -> dict | None:
  """config.model.moe -> the `moe` argument of `ViT` (None for router='dense')."""
  if moe.router == 'dense':
    return None
  out = dict(router=moe.router, router_kwargs=moe.router_kwargs.to_dict(),
             num_experts=moe.num_experts, expert_hidden=moe.expert_hidden, engine=moe.engine,
             group_size=moe.group_size, glu=moe.glu, activation=moe.activation)
  placement = {k: moe[k] for k in ('every', 'last_n', 'layers') if moe[k] is not None}
  if not placement:
    raise ValueError('config.model.moe: give a placement (every, last_n or layers) for the '
                     f'{moe.router!r} MoE layers, or set router=dense.')
  out.update(placement)
  return out


def token_ids_kwargs(model: ml_collections.ConfigDict) -> dict:
  """config.model -> the ViT's `token_ids_kwargs` (patch-content ids read the pixels)."""
  if model.token_ids == 'patch_content':
    return dict(model.patch_content.to_dict(), value_range=PIXEL_RANGE)
  return {}


def build_model(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> ViT:
  m = config.model
  return ViT(num_classes=m.num_classes, image_size=m.image_size, channels=m.channels,
             patch_size=m.patch_size, width=m.width, depth=m.depth, mlp_dim=m.mlp_dim,
             num_heads=m.num_heads, pool=m.pool, posemb=m.posemb, moe=moe_kwargs(m.moe),
             token_ids=m.token_ids, token_ids_kwargs=token_ids_kwargs(m), dtype=m.dtype,
             rngs=rngs)


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

"""Image classification (the ViT task): softmax cross-entropy on class labels.

    config.task = dict(name='image_classification', label_smoothing=0.1)
    batch: 'image' [B, H, W, C] float32 in [-1, 1], 'label' [B] int32 (+ 'mask' [B] in eval)

Train loss: cross-entropy against label-smoothed one-hot targets (ε = label_smoothing);
eval: plain cross-entropy and accuracy over the whole eval split (padding masked out).
Headline: test accuracy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from moe_jax.data.images import ImageData
from moe_jax.errors import ConfigError
from moe_jax.tasks.base import Task


class ImageClassification(Task):
  name = 'image_classification'
  headline = ('test_accuracy', 'test accuracy')

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    ls = config.task.get('label_smoothing', 0.0)
    if not 0.0 <= ls < 1.0:
      raise ConfigError(f'must be in [0, 1), got {ls}.', field='config.task.label_smoothing')

  def prepare(self) -> None:
    c = self.config
    self.data = ImageData.from_config(c.data, batch_size=c.batch_size,
                                      eval_batch_size=c.eval_batch_size, seed=c.seed,
                                      image_size=c.model.get('image_size'))
    got = {'num_classes': self.data.num_classes, 'channels': self.data.image_shape[2]}
    for field, value in got.items():
      if c.model.get(field) != value:
        raise ConfigError(f'{c.data.name!r} has {value} {field.replace("num_", "")}, the model '
                          f'{c.model.get(field)}; set --config.model.{field}={value}.',
                          field=f'config.model.{field}')

  def model_inputs(self, batch: dict) -> dict:
    return {'images': batch['image']}

  def loss(self, logits, batch):
    """logits [B, classes] float32 -> (mean loss, per-example loss [B], metrics)."""
    smoothing = self.config.task.get('label_smoothing', 0.0)
    targets = optax.smooth_labels(jax.nn.one_hot(batch['label'], logits.shape[-1]), smoothing)
    per_example = optax.softmax_cross_entropy(logits, targets)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    count = jnp.asarray(batch['label'].shape[0], jnp.float32)
    return jnp.mean(per_example), per_example, {'accuracy': accuracy, 'count/examples': count}

  def eval_sums(self, logits, batch):
    mask = batch['mask']
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    return dict(loss_sum=jnp.sum(per_example * mask), correct=jnp.sum(correct * mask),
                weight=jnp.sum(mask))

  def eval_metrics(self, sums: dict) -> dict[str, float]:
    n = float(sums['weight'])
    return {'eval/accuracy': float(sums['correct']) / n, 'eval/loss': float(sums['loss_sum']) / n}

  def final_metrics(self, last_eval: dict) -> dict[str, float]:
    return {'test_accuracy': last_eval['eval/accuracy'], 'test_loss': last_eval['eval/loss']}

  def routing_pictures(self, batch: dict, views: dict, *, num_examples: int) -> list:
    """Patches coloured by expert per MoE layer; Soft MoE slot heat maps
    (`inspection.images`). The patch grid comes from the ViT's config."""
    from moe_jax.inspection import images   # matplotlib: only when pictures are drawn
    if not views:
      return []
    n = min([num_examples, len(batch['image'])] + [len(v['weight']) for v in views.values()])
    views = {name: {k: a[:n] for k, a in v.items()} for name, v in views.items()}
    return images.image_pictures(np.asarray(batch['image'][:n]), views,
                                 patch_size=self.config.model.patch_size,
                                 class_token=self.config.model.get('pool', 'gap') == 'token')

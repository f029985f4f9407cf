"""Shared by the trainer tests: load config files by path, a tiny ViT config, mock data."""
import contextlib
import os

import jax
import numpy as np
import tensorflow as tf
from jax.experimental.compilation_cache import compilation_cache
import tensorflow_datasets as tfds

from moe_jax.train import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config_module(relpath: str):
  """Imports a config file of this repository by path (as `config_flags` does)."""
  return config_lib.load_config_module(os.path.join(ROOT, relpath))


def tiny_config(arg: str = 'soft_moe,tiny', **overrides):
  """configs/vit/fashion_mnist.py with a 2-block, width-16 ViT and 8-image batches."""
  c = load_config_module('configs/vit/fashion_mnist.py').get_config(arg)
  c.model.update(patch_size=7, width=16, depth=2, mlp_dim=32, num_heads=2)
  c.model.moe.last_n = 1
  c.model.moe.num_experts = 4
  c.update(num_train_steps=6, batch_size=8, eval_batch_size=16, log_every_steps=1,
           eval_every_steps=3, checkpoint_every_steps=2, count_flops=False)
  c.optimizer.warmup_steps = 2
  return config_lib.apply_overrides(c, overrides)


@contextlib.contextmanager
def mock_fashion_mnist(n: int = 64):
  """tfds.testing.mock_data with learnable fake data: the label is readable from the image."""
  def as_dataset_fn(self, split, **kwargs):
    rng = np.random.default_rng(0 if 'train' in str(split) else 1)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 28, 28, 1)).astype(np.uint8)
    images[np.arange(n), 2 * labels + 3, 5:20, 0] = 255       # a bright row at 2·label + 3
    return tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})
  with tfds.testing.mock_data(num_examples=n, as_dataset_fn=as_dataset_fn):
    yield


@contextlib.contextmanager
def persistent_xla_cache(path: str):
  """A disk cache of compiled programs, so repeated runs of one config compile once."""
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update('jax_compilation_cache_dir', old[0])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', old[1])
    compilation_cache.reset_cache()


def image_task(label_smoothing: float = 0.0):
  """The image-classification task with no data loaded (for its loss and the train step)."""
  import ml_collections
  from moe_jax.tasks import ImageClassification
  return ImageClassification(ml_collections.ConfigDict(
      {'task': {'name': 'image_classification', 'label_smoothing': label_smoothing}}))

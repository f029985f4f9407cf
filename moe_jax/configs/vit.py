"""The ViT image-classification config every file in configs/vit/ starts from.

    c = vit.base_config()               # trainer fields + task + data + model
    c.model.update(vit.PRESETS['tiny'])
    config_lib.set_router(c.model.moe, 'soft_moe')

Every field a user may want to override on the command line
(`--config.model.moe.last_n=3`) exists here, typed, so `config_flags` can check it.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from moe_jax.data.images import PIXEL_RANGE
from moe_jax.models.vit import PAPER_MOE, PRESETS  # noqa: F401 (re-exported for config files)
from moe_jax.train import config_lib


def moe_block(router: str = 'soft_moe', num_experts: int = 16) -> ml_collections.ConfigDict:
  """config.model.moe: the `layers.MoeConfig` fields (router 'dense' = no MoE)."""
  return ml_collections.ConfigDict(dict(
      router=router, router_kwargs=dict(config_lib.ROUTER_KWARGS.get(router, {})),
      num_experts=num_experts, expert_hidden=config_dict.placeholder(int), engine='gather',
      group_size=config_dict.placeholder(int), every=config_dict.placeholder(int),
      last_n=config_dict.placeholder(int), layers=config_dict.placeholder(tuple),
      glu=False, activation='gelu'))


def base_config() -> ml_collections.ConfigDict:
  """All fields of a ViT image-classification run, with CPU-friendly defaults."""
  c = config_lib.base_config()
  c.task = ml_collections.ConfigDict(dict(name='image_classification', label_smoothing=0.0))
  c.model = ml_collections.ConfigDict(dict(
      name='vit', size='tiny', num_classes=10, image_size=28, channels=1, pool='gap',
      posemb='learn', dtype='float32', token_ids='position', **PRESETS['tiny']))
  # Options of token_ids='patch_content' (models.token_ids.patch_content_ids). Hash
  # routers read these ids; value_range is the data pipeline's pixel range.
  c.model.patch_content = ml_collections.ConfigDict(dict(
      levels=4, bits=4, flat_std=0.02, seed=0, value_range=PIXEL_RANGE))
  c.model.moe = moe_block()
  c.data = ml_collections.ConfigDict(dict(
      name='fashion_mnist', train_split='train', eval_split='test',
      data_dir=config_dict.placeholder(str), idx_dir=config_dict.placeholder(str),
      download=True, mode='memory', augment='none', shuffle_buffer=10_000))
  return c

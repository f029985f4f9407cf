r"""ViT / V-MoE / Soft MoE at paper sizes on ImageNet-1k (TFDS imagenet2012), for accelerators.

Argument: `router,size` with router in {dense, tokens_choice, experts_choice, soft_moe}
and size in {S/16, B/16, L/16, H/14} (default `soft_moe,S/16`):

    TFDS_DATA_DIR=gs://BUCKET/tensorflow_datasets python -m moe_jax.train.main \
        --config=configs/vit/imagenet.py:soft_moe,B/16 --workdir=gs://BUCKET/workdirs/soft_b16

imagenet2012 needs a manual download (TFDS cannot fetch it): prepare it once with
`tfds build imagenet2012 --manual_dir=...` and point TFDS_DATA_DIR (or
`--config.data.data_dir`) at the result.

Model (Soft MoE paper, Puigcerver et al. 2023, Table 1 and App. B): MoE layers in the
last half of the blocks (S, B: last 6; L: last 12; H: last 16); Soft MoE with 128
experts of 1 slot each; tokens choice top-1 and experts choice with capacity factor 1
and 32 experts, routing groups of 8 images (the paper's V-MoE baselines), batch-priority
routing for tokens choice. Training follows the big_vision ImageNet-1k ViT recipe
(AdamW-style, batch 4096, lr 1e-3 warmup 10k steps then cosine, weight decay 0.1 on
matrices, inception crop + flip, 90 epochs ~ 28k steps); the paper itself trained on
JFT-4B, which is not public.

Result: not run here (needs TPU/GPU time); the shipped tests check that every size and
router builds (`jax.eval_shape`) with the paper's parameter counts.
"""
from moe_jax.configs import vit
from moe_jax.configs.vit import PAPER_MOE, PRESETS
from moe_jax.train import config_lib

SIZES = ('S/16', 'B/16', 'L/16', 'H/14')
ROUTERS = ('dense', 'tokens_choice', 'experts_choice', 'soft_moe')


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, router=('soft_moe', ROUTERS), size=('S/16', SIZES))
  c = vit.base_config()
  c.model.update(PRESETS[a.size])
  c.model.update(size=a.size, num_classes=1000, image_size=224, channels=3, pool='gap',
                 posemb='learn', dtype='bfloat16')
  c.num_train_steps = 28_000
  c.batch_size = 4096
  c.eval_batch_size = 1024
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.checkpoint_every_steps = 1000
  c.optimizer.update(learning_rate=1e-3, warmup_steps=10_000, weight_decay=0.1,
                     grad_clip_norm=1.0)
  c.task.label_smoothing = 0.0
  c.data.update(name='imagenet2012', train_split='train[:99%]', eval_split='validation',
                mode='stream', augment='inception_crop', shuffle_buffer=250_000, download=False)

  config_lib.set_router(c.model.moe, a.router)
  c.model.moe.last_n = PAPER_MOE[a.size]['last_n']
  tokens = (224 // PRESETS[a.size]['patch_size']) ** 2
  if a.router == 'soft_moe':
    c.model.moe.num_experts = PAPER_MOE[a.size]['num_experts']
  else:
    c.model.moe.num_experts = 32
    c.model.moe.group_size = 8 * tokens      # 8 images per routing group (V-MoE)
  c.model.moe.engine = 'gather'
  return c

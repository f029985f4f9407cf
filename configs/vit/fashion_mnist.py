r"""ViT (+ MoE) on Fashion-MNIST, sized for a CPU.

Argument: `router,size` with router `dense` or any key of `moe_jax.layers.ROUTERS`
(the Pareto comparison uses dense, tokens_choice, experts_choice, soft_moe) and size in
{tiny, small} (default `soft_moe,tiny`, the `make demo` run):

    python -m moe_jax.train.main --config=configs/vit/fashion_mnist.py:soft_moe,tiny \
        --workdir=workdirs/fmnist_soft_moe_tiny

Override anything: `--config.num_train_steps=500 --config.model.moe.num_experts=32
--config.model.moe.router_kwargs.k=2`.

Model: patch 7 (4x4 = 16 tokens: 3x cheaper per step than patch 4 for about the same
accuracy per training FLOP on this dataset), global average pooling; MoE layers replace
the MLP in the last half of the blocks (Soft MoE paper placement), one routing group per
image. Soft MoE: 32 experts with 1 slot each (32 slots for 16 tokens); tokens choice: 8
experts, top-1 with batch priority, capacity factor 1 (C = 2); experts choice: 8
experts, capacity factor 1; the other routers: 8 experts with their papers' defaults
(DeepSeek k=2 of 8). AdamW (lr 2e-3 tiny / 1e-3 small, warmup 200, cosine decay,
weight decay 0.05), label smoothing 0.1, random horizontal flips, batch 128.

Hash routers with image ids: `--config=configs/vit/fashion_mnist.py:hash,tiny
--config.model.token_ids=patch_content`.

Result (soft_moe,tiny = `make demo`, 2 CPU cores, quiet machine, TCMalloc): test
accuracy 89.04% after 5000 steps, 138 s of training (165 s with compilation and
evaluation).
`experiments/vit_pareto.py --sweep=cpu` gives the other routers' results (README).
"""
from moe_jax.configs import vit
from moe_jax.layers import ROUTERS as _REGISTRY
from moe_jax.train import config_lib

SIZES = {
    # num_train_steps, learning rate, MoE experts (soft / sparse)
    'tiny': dict(steps=5000, lr=2e-3, soft_experts=32, sparse_experts=8),
    'small': dict(steps=5000, lr=1e-3, soft_experts=32, sparse_experts=8),
}
ROUTERS = ('dense',) + tuple(_REGISTRY)
# Router kwargs for 8 experts where a paper's default does not fit (V3 routes 8 of 256).
SMALL_E_KWARGS = {'deepseek': dict(k=2)}


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, router=('soft_moe', ROUTERS), size=('tiny', tuple(SIZES)))
  s = SIZES[a.size]
  c = vit.base_config()
  c.model.size = a.size
  c.model.update(vit.PRESETS[a.size])
  c.model.patch_size = 7
  c.num_train_steps = s['steps']
  c.optimizer.learning_rate = s['lr']
  c.optimizer.warmup_steps = 200
  c.optimizer.weight_decay = 0.05
  c.log_every_steps = 50
  c.task.label_smoothing = 0.1
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 500

  config_lib.set_router(c.model.moe, a.router, **SMALL_E_KWARGS.get(a.router, {}))
  c.model.moe.last_n = c.model.depth // 2
  c.model.moe.num_experts = s['soft_experts'] if a.router == 'soft_moe' else s['sparse_experts']
  c.data.augment = 'flip'
  return c

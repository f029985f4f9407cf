r"""Decoder-only language model (T5.1.1 blocks) with MoE on causal LM over debian_docs.

Argument `router,size`: router `dense` or any key of `moe_jax.layers.ROUTERS`; size
`tiny` or `small` for a CPU (default `switch,tiny`):

    python -m moe_jax.train.main --config=configs/t5/causal_lm.py:switch,tiny \
        --workdir=workdirs/lm_switch_tiny

A decoder's MoE layers must be causal: a router that reads later tokens (experts_choice,
experts_choice_capped, soft_moe, base, sinkhorn_base, tokens_choice with batch_priority,
any group_size) is a ConfigError naming the causal routers, unless
`--config.model.moe.allow_future_leak=True` (a research flag: the leak is then measured,
not hidden). Hash routers route on the real token ids.

Data: `make data` first; 128-token sequences of packed documents (next-token prediction,
every token a target). Model: tiny d 128, 4 blocks, 4 heads, GEGLU d_ff 512 (small: d
256, 6 blocks, d_ff 1024), RMSNorm, T5 relative position bias, untied output layer,
z-loss 1e-4; MoE every other block, 8 experts. AdamW 3e-3, 100 warmup steps, cosine,
batch 32.

Result (`switch,tiny`, 1500 steps, 2 CPU cores): validation negative log perplexity -3.910
(3.910 nats per token, perplexity 49.9, token accuracy 29.2%; -4.527 at step 500, -4.048
at 1000); 819 s of training at 1.83 steps/s while other jobs shared the machine (2.07
steps/s, 8,450 tokens/s, alone).
"""
from moe_jax.configs import t5
from moe_jax.layers import ROUTERS as _REGISTRY
from moe_jax.train import config_lib

ROUTERS = ('dense',) + tuple(_REGISTRY)
SIZES = {'tiny': dict(steps=1500), 'small': dict(steps=500)}


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, router=('switch', ROUTERS), size=('tiny', tuple(SIZES)))
  c = t5.base_config('causal_lm', a.size, steps=SIZES[a.size]['steps'])
  t5.set_block_router(c.model.moe, a.router)
  return c

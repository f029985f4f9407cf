r"""T5.1.1-style encoder-decoder with MoE on T5 span corruption over debian_docs.

Argument `router,size`: router `dense` or any key of `moe_jax.layers.ROUTERS`; size
`tiny` or `small` for a CPU (default `switch,tiny`, the `make demo-lm` run):

    python -m moe_jax.train.main --config=configs/t5/span_corruption.py:switch,tiny \
        --workdir=workdirs/t5_switch_tiny

Data: `make data` first (Debian's Python + Linux reST docs, SentencePiece unigram 4096
tiny / 8192 small, T5 ids). Inputs 128 tokens (141 raw tokens, noise density 0.15, mean
span 3) -> targets 29, by T5's length formula; documents packed, attention never crosses
them. On a networked machine `--config.data.name=c4/en:3.1.0` (or lm1b, wiki40b/en).

Model (`moe_jax.models.t5`): tiny d 128, 2+2 blocks, 4 heads, GEGLU d_ff 512; small d
256, 4+4 blocks, d_ff 1024; RMSNorm pre-norm, T5 relative position bias, no biases,
untied output layer; output-logit z-loss 1e-4 (T5X). MoE every other block of each stack
(Switch placement), 8 experts with the dense MLP's shape. The encoder takes the router;
the decoder takes it too when it is causal, else top-2 token choice (T5X's expert-choice
recipe keeps token choice in the decoder). Switch: top-1, capacity 1.25 train / 2.0 eval,
balancing loss 1e-2. AdamW 3e-3, 100 warmup steps, cosine, batch 32.

Presets at paper sizes build (`jax.eval_shape`) with their parameter counts checked in
tests/models (`moe_jax.models.t5.PRESETS`: t5_1_1_small/base, switch_base_128,
tokens_choose_base, st_moe_base): `--config.model.size=...` does not load them; use
`configs/t5/presets.py`.

Result (`switch,tiny` = `make demo-lm`, 3000 steps, 2 CPU cores): validation negative log
perplexity -4.136 (4.136 nats per target token, perplexity 62.5, token accuracy 30.9%),
453 s of training at 6.6 steps/s with TCMalloc on a quiet machine (4.4 steps/s, 4,140
target tokens/s, without it). `small`: 0.92 steps/s, 700 steps
(not trained to the end here).
"""
from moe_jax.configs import t5
from moe_jax.layers import ROUTERS as _REGISTRY
from moe_jax.train import config_lib

ROUTERS = ('dense',) + tuple(_REGISTRY)
SIZES = {'tiny': dict(steps=3000), 'small': dict(steps=700)}


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, router=('switch', ROUTERS), size=('tiny', tuple(SIZES)))
  c = t5.base_config('span_corruption', a.size, steps=SIZES[a.size]['steps'])
  t5.set_block_router(c.model.encoder_moe, a.router)
  decoder_router = a.router if a.router == 'dense' or _REGISTRY[a.router].causal else 'tokens_choice'
  t5.set_block_router(c.model.decoder_moe, decoder_router)
  return c

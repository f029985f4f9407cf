"""The T5-style language-model configs every file in configs/t5/ starts from.

    c = t5.base_config('span_corruption', 'tiny')   # encoder-decoder; 'causal_lm': decoder
    t5.set_router(c, 'switch')                        # MoE every other block of each stack

Model sizes are `moe_jax.models.t5.PRESETS` / `DECODER_PRESETS`; data fields are
`moe_jax.data.text.config_defaults` (every one overridable: `--config.data.seq_len=256`).
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from moe_jax.data.text import config_defaults
from moe_jax.data.text_objectives import raw_length_for
from moe_jax.layers import ROUTERS
from moe_jax.models.t5 import DECODER_PRESETS, PRESETS
from moe_jax.train import config_lib

OBJECTIVES = {'span_corruption': 'encoder_decoder', 'causal_lm': 'decoder'}
VOCAB = {'tiny': 4096, 'small': 8192}      # the two vocabularies `make data` prepares
# Placeholders' types for data fields whose default is None (so --config.data.x=... works).
_NONE_TYPES = {'data_dir': str, 'tokenizer_path': str, 'eval_max_rows': int, 'cache_dir': str,
               'targets_length': int}

# Router options for language models (T5X / papers). Token choice is top-2 without batch
# priority (BPR reads later tokens; T5X uses it in the encoder only); Soft MoE sizes its
# slots from the sequence (about one slot per token); DeepSeek routes 2 of 8.
LM_ROUTER_KWARGS = {
    'tokens_choice': dict(k=2, capacity_factor=1.25, eval_capacity_factor=2.0),
    'experts_choice': dict(capacity_factor=2.0),
    'soft_moe': dict(num_slots=None, capacity_factor=1.0),
    'hash': dict(kind='random'),
    'deepseek': dict(k=2),
}


def data_config(objective: str) -> ml_collections.ConfigDict:
  d = config_defaults(objective)
  return ml_collections.ConfigDict({k: (config_dict.placeholder(_NONE_TYPES[k]) if v is None
                                        else v) for k, v in d.items()})


def moe_block(router: str = 'dense', num_experts: int = 8, every: int = 2) -> ml_collections.ConfigDict:
  """One stack's MoE fields (`layers.MoeConfig`); None-valued expert options (activation,
  glu, use_bias, expert_hidden) take the model's own MLP's."""
  c = ml_collections.ConfigDict(dict(
      router=router, router_kwargs={}, num_experts=num_experts,
      expert_hidden=config_dict.placeholder(int), engine='gather',
      group_size=config_dict.placeholder(int), every=every,
      last_n=config_dict.placeholder(int), layers=config_dict.placeholder(tuple),
      glu=config_dict.placeholder(bool), activation=config_dict.placeholder(str),
      use_bias=config_dict.placeholder(bool), allow_future_leak=False))
  set_block_router(c, router)
  return c


def set_block_router(moe: ml_collections.ConfigDict, router: str, **kwargs) -> None:
  if router != 'dense' and router not in ROUTERS:
    raise ValueError(f"router {router!r} is not 'dense' or one of {sorted(ROUTERS)}.")
  moe.router = router
  moe.router_kwargs = ml_collections.ConfigDict({**LM_ROUTER_KWARGS.get(router, {}), **kwargs})


def base_config(objective: str, size: str, steps: int = 1000) -> ml_collections.ConfigDict:
  """A dense T5-style model of `size` trained on `objective` over debian_docs for `steps`
  (logged every 50, evaluated and checkpointed every 500)."""
  c = config_lib.base_config()
  c.update(num_train_steps=steps, log_every_steps=50, eval_every_steps=500,
           checkpoint_every_steps=500)
  c.task = ml_collections.ConfigDict(dict(name=objective, z_loss=1e-4))
  c.data = data_config(objective)
  c.batch_size = 32
  c.eval_batch_size = 64
  c.optimizer.update(learning_rate=3e-3, warmup_steps=100, weight_decay=0.0, grad_clip_norm=1.0)
  c.data.vocab_size = VOCAB[size]
  # The model follows the data's vocabulary and lengths (references: overriding
  # --config.data.vocab_size changes both).
  if objective == 'span_corruption':
    _, targets = raw_length_for(c.data.inputs_length)
    model = dict(PRESETS[size], name='encoder_decoder', size=size,
                 vocab_size=c.data.get_ref('vocab_size'),
                 max_input_length=c.data.get_ref('inputs_length'), max_target_length=targets,
                 encoder_moe=moe_block(), decoder_moe=moe_block())
  else:
    model = dict(DECODER_PRESETS[size], name='decoder', size=size,
                 vocab_size=c.data.get_ref('vocab_size'), max_length=c.data.get_ref('seq_len'),
                 moe=moe_block())
  c.model = ml_collections.ConfigDict(dict(model, activation='gelu', glu=True,
                                           tie_embeddings=False, dtype='float32'))
  return c

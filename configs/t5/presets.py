r"""Paper-size T5-style models on C4 span corruption, for accelerators.

Argument: a key of `moe_jax.models.t5.PRESETS` other than the CPU sizes:
t5_1_1_small, t5_1_1_base, t5_base (T5 1.0, the Switch paper's dense baseline),
switch_base_128, tokens_choose_base (T5X top-2, 64 experts), st_moe_base:

    python -m moe_jax.train.main --config=configs/t5/presets.py:switch_base_128 \
        --workdir=gs://BUCKET/workdirs/switch_base_128 --config.mesh.expert=-1

Data: TFDS `c4/en:3.1.0` (a networked machine; TFDS prepares it with Apache Beam, or copy
a prepared one), a SentencePiece unigram vocabulary of 32,028 pieces + 100 sentinels =
32,128 ids (T5's size) trained on its first 100M characters; inputs 512 -> targets 114
(T5's length formula), batch 256, 100k steps (the Switch paper's Table 1 budget).
Optimizer: AdamW with 10k warmup steps and cosine decay: the papers used Adafactor with
an inverse-square-root schedule, which this codebase does not implement, so absolute
numbers are not the papers'.

Result: not run here (needs accelerators and C4); the tests build every preset
(`jax.eval_shape`) and check its parameter count against the papers (README, "Models").
"""
import ml_collections

from moe_jax.configs import t5
from moe_jax.models.t5 import PRESETS as _MODELS
from moe_jax.train import config_lib

PRESETS = tuple(k for k in _MODELS if k not in ('tiny', 'small'))


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, preset=('t5_1_1_small', PRESETS))
  c = t5.base_config('span_corruption', 'tiny')
  c.data.update(name='c4/en:3.1.0', eval_split='validation', inputs_length=512,
                vocab_size=32128, check_sources=False)
  preset = dict(_MODELS[a.preset])
  vocab = preset.pop('vocab_size')
  assert vocab == c.data.vocab_size
  c.model = ml_collections.ConfigDict(dict(
      name='encoder_decoder', size=a.preset, vocab_size=c.data.get_ref('vocab_size'),
      max_input_length=512, max_target_length=114, dtype='bfloat16', **preset))
  c.update(batch_size=256, eval_batch_size=256, num_train_steps=100_000, log_every_steps=100,
           eval_every_steps=5000, checkpoint_every_steps=2000, count_flops=True)
  c.optimizer.update(learning_rate=1e-3, warmup_steps=10_000, weight_decay=0.0)
  return c

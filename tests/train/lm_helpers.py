"""Shared by the language-model trainer tests: tiny configs and mock text (no installed corpus)."""
import contextlib
import os

import tensorflow_datasets as tfds

from moe_jax.train import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 384        # SentencePiece needs a few hundred pieces (byte fallback + sentinels)


def load_config_module(relpath: str):
  return config_lib.load_config_module(os.path.join(ROOT, relpath))


def tiny_lm_config(objective: str, router: str, data_dir: str, **overrides):
  """configs/t5/<objective>.py shrunk to a width-16 model, 16-token rows, batch 4."""
  c = load_config_module(f'configs/t5/{objective}.py').get_config(f'{router},tiny')
  c.data.update(data_dir=data_dir, vocab_size=VOCAB)
  if objective == 'causal_lm':
    c.data.seq_len = 16
    c.model.update(depth=2, max_length=16)
    moes = [c.model.moe]
  else:
    c.data.inputs_length = 16
    c.model.update(encoder_depth=2, decoder_depth=2, max_input_length=16, max_target_length=5)
    moes = [c.model.encoder_moe, c.model.decoder_moe]
  c.model.update(width=16, num_heads=2, head_dim=8, mlp_dim=32)
  for moe in moes:
    moe.num_experts = 4
  c.update(num_train_steps=6, batch_size=4, eval_batch_size=4, log_every_steps=1,
           eval_every_steps=3, checkpoint_every_steps=2, count_flops=False)
  c.data.eval_max_rows = 8
  c.optimizer.warmup_steps = 2
  return config_lib.apply_overrides(c, overrides)


@contextlib.contextmanager
def mock_text(num_examples: int = 400):
  """tfds.testing.mock_data: random-letter documents for any TFDS text name."""
  with tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE):
    yield

"""Language-model tasks on real text: causal LM (decoder) and T5 span corruption
(encoder-decoder). Data: `moe_jax.data.text.TextData` (batches = f(seed, step)).

    config.task = dict(name='causal_lm' | 'span_corruption', z_loss=0.0)

Loss: cross-entropy in nats per real target token (T5X's NUM_REAL_TARGET_TOKENS
normalisation: the sum over the batch's target tokens divided by their number; padding
has weight 0), plus the optional output-logit z-loss z_loss · log(Z)² per target token
(T5X / PaLM). Per-example loss (REINFORCE rewards): each row's mean over its target
tokens. Eval: the same loss over the fixed validation batches, its negation (negative
log perplexity, as the Switch paper reports it), perplexity and token accuracy.
Throughput: target tokens per second ('count/target_tokens').
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from moe_jax.errors import ConfigError
from moe_jax.tasks.base import Task


def token_losses(logits, targets, weights, z_loss: float = 0.0):
  """Per-token cross-entropy (+ z-loss) and correctness.

  Args:
    logits: [B, L, V] float32; targets: [B, L] int; weights: [B, L] float (0 = padding).
  Returns:
    (loss [B, L] weighted, correct [B, L] weighted, z [B, L] weighted log(Z)²).
  """
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  z = jnp.square(log_z)
  loss = ce + z_loss * z
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return loss * weights, correct * weights, z * weights


class TextTask(Task):
  """Shared by the two objectives; subclasses set `objective`, `model_inputs` and
  `stack_inputs`."""
  objective = ''
  # stack name (prefix of its MoE layers' names) -> (batch key of the token ids its MoE
  # layers see, batch key of their segment ids); for the routing pictures.
  stack_inputs: dict[str, tuple[str, str]] = {}
  headline = ('neg_log_perplexity', 'validation neg log perplexity')

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    z = config.task.get('z_loss', 0.0)
    if not z >= 0:
      raise ConfigError(f'must be >= 0, got {z}.', field='config.task.z_loss')

  def prepare(self) -> None:
    from moe_jax.data.text import TextData   # imported late: tokenizer, TF
    c = self.config
    self.data = TextData.from_config(c.data, objective=self.objective, batch_size=c.batch_size,
                                     eval_batch_size=c.eval_batch_size, seed=c.seed)
    vocab = c.model.get('vocab_size')
    if vocab is not None and vocab < self.data.vocab_size:
      raise ConfigError(f'{vocab} is smaller than the tokenizer\'s {self.data.vocab_size} ids; '
                        f'set --config.model.vocab_size={self.data.vocab_size} (or larger).',
                        field='config.model.vocab_size')

  def loss(self, logits, batch):
    w = batch['weights'].astype(jnp.float32)
    loss, correct, z = token_losses(logits, batch['targets'], w, self.config.task.get('z_loss', 0.0))
    tokens = jnp.sum(w)
    per_example = jnp.sum(loss, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    denom = jnp.maximum(tokens, 1.0)
    metrics = {'accuracy': jnp.sum(correct) / denom, 'z_loss': jnp.sum(z) / denom,
               'count/target_tokens': tokens,
               'count/examples': jnp.asarray(w.shape[0], jnp.float32)}
    return jnp.sum(loss) / denom, per_example, metrics

  def eval_sums(self, logits, batch):
    w = batch['weights'].astype(jnp.float32)
    loss, correct, _ = token_losses(logits, batch['targets'], w)
    return dict(loss_sum=jnp.sum(loss), correct=jnp.sum(correct), weight=jnp.sum(w))

  def eval_metrics(self, sums: dict) -> dict[str, float]:
    n = max(float(sums['weight']), 1.0)
    loss = float(sums['loss_sum']) / n
    return {'eval/loss': loss, 'eval/neg_log_perplexity': -loss,
            'eval/perplexity': float(jnp.exp(loss)), 'eval/accuracy': float(sums['correct']) / n,
            'eval/target_tokens': float(sums['weight'])}

  def final_metrics(self, last_eval: dict) -> dict[str, float]:
    return {'neg_log_perplexity': last_eval['eval/neg_log_perplexity'],
            'validation_loss': last_eval['eval/loss'],
            'validation_perplexity': last_eval['eval/perplexity'],
            'validation_accuracy': last_eval['eval/accuracy']}

  def results_info(self) -> dict:
    return {'tokenizer': dict(self.data.tokenizer_info)} if self.data is not None else {}

  def routing_pictures(self, batch: dict, views: dict, *, num_examples: int) -> list:
    """Tokens coloured by expert and each expert's most frequent tokens, per MoE layer
    (`inspection.text`); the table counts every row of `views`. Decoder inputs show the
    start id 0 as '<start>'."""
    from moe_jax.inspection import text   # matplotlib: only when pictures are drawn
    if not views:
      return []
    rows = min(len(v['weight']) for v in views.values())
    stacks = {name: (np.asarray(batch[ids][:rows]), np.asarray(batch[seg][:rows]) > 0)
              for name, (ids, seg) in self.stack_inputs.items()}
    tokenizer = self.data.tokenizer
    piece = lambda i: '<start>' if i == 0 else tokenizer.piece(i)
    return text.text_pictures(stacks, views, piece, num_examples=num_examples)


class CausalLm(TextTask):
  """Next-token prediction with a decoder; batch 'tokens', 'targets', 'segment_ids',
  'positions', 'weights', each [B, L]."""
  name = 'causal_lm'
  objective = 'causal_lm'
  stack_inputs = {'decoder': ('tokens', 'segment_ids')}

  def model_inputs(self, batch: dict) -> dict:
    return {'tokens': batch['tokens'], 'segment_ids': batch['segment_ids'],
            'positions': batch['positions']}


class SpanCorruption(TextTask):
  """T5 span corruption with an encoder-decoder; batch 'inputs' [B, Li] (+ segment ids,
  positions), 'decoder_inputs', 'targets', 'target_segment_ids', 'target_positions',
  'weights' [B, Lt]."""
  name = 'span_corruption'
  objective = 'span_corruption'
  stack_inputs = {'encoder': ('inputs', 'input_segment_ids'),
                  'decoder': ('decoder_inputs', 'target_segment_ids')}

  def model_inputs(self, batch: dict) -> dict:
    return {'inputs': batch['inputs'], 'decoder_inputs': batch['decoder_inputs'],
            'input_segment_ids': batch['input_segment_ids'],
            'input_positions': batch['input_positions'],
            'target_segment_ids': batch['target_segment_ids'],
            'target_positions': batch['target_positions']}

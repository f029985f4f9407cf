"""TFDS text input pipeline for T5-style LMs; batches are a function of (seed, step).

    data = TextData.from_config(config.data, objective='span_corruption', batch_size=32,
                                eval_batch_size=64, seed=0)
    for step, batch in data.train_iterator(start_step):   # this process's rows
      ...
    for batch in data.eval_batches():                     # fixed; padding has weight 0
      ...
    data.vocab_size; data.tokenizer.decode(ids); data.tokenizer_info   # -> results.json

Batch keys (all [B, L] int32, weights float32; segment 0 and weight 0 = padding):
* causal_lm: 'tokens' (model input: targets shifted right in each segment, 0 first),
  'targets', 'segment_ids', 'positions', 'weights'; L = config.data.seq_len.
* span_corruption: 'inputs', 'input_segment_ids', 'input_positions' [B, Li];
  'decoder_inputs', 'targets', 'target_segment_ids', 'target_positions', 'weights'
  [B, Lt]; Li = config.data.inputs_length, Lt from T5's length formula (128 -> 29).

Preparation happens once and is cached beside the TFDS data
(`<data_dir>/<name>/<version>/moe_jax/`): the SentencePiece model (trained on the
train split only) and every split tokenised into one flat int32 array, keyed by the
dataset's checksum and the tokenizer's sha256.

Order: every document (plus EOS for causal LM) is cut into pieces that fit a row
(raw span-corruption segments of T5's raw length), and pieces are packed into rows
once, in an order drawn from the seed. Epoch e visits the rows in a permutation drawn
from (seed, e); step t is batch t mod steps_per_epoch of epoch t div steps_per_epoch,
and span-corruption noise is drawn from (seed, step, row). A resumed run sees exactly
the batches of an uninterrupted one. Eval rows come from the eval split packed with a
fixed seed (config.data.eval_seed), so every arm and seed evaluates on the same rows.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import numpy as np

from moe_jax.data import text_corpus
from moe_jax.data import text_objectives as obj
from moe_jax.data.text_cache import (Split, cache_dir, dataset_identity, load_or_train_tokenizer,
                                     tokenize_split)
from moe_jax.data.text_packing import chunk_documents, pack_plan, pack_rows
from moe_jax.data.tokenizer import Tokenizer
from moe_jax.errors import ConfigError

OBJECTIVES = ('causal_lm', 'span_corruption')
_PLAN, _EPOCH, _NOISE = 1, 2, 3     # distinct streams of the numpy seed sequence


def config_defaults(objective: str) -> dict:
  """config.data fields TextData reads (a config may override any of them).

  The caps matter for web-scale datasets only (debian_docs has 8.7M training tokens):
  the tokenizer trains on at most `tokenizer_max_chars` characters of the train split,
  sampling `tokenizer_max_sentences` lines; a split is tokenised in TFDS's reading order
  until `max_train_tokens` / `max_eval_tokens` (whole documents; 0 = all). A field set
  to None keeps its default.
  """
  d = dict(name=text_corpus.NAME, data_dir=None, train_split='train', eval_split='validation',
           text_key='text', vocab_size=4096, num_extra_ids=100, tokenizer_path=None,
           tokenizer_max_sentences=2_000_000, tokenizer_max_chars=100_000_000, pack=True,
           eval_seed=0, eval_max_rows=None, max_train_tokens=100_000_000,
           max_eval_tokens=2_000_000, cache_dir=None, check_sources=True, download=True)
  if objective == 'causal_lm':
    d.update(seq_len=128)
  else:
    d.update(inputs_length=128, targets_length=None, noise_density=obj.NOISE_DENSITY,
             mean_noise_span_length=obj.MEAN_NOISE_SPAN_LENGTH)
  return d


@dataclasses.dataclass
class TextData:
  """A tokenised text dataset, one objective, and its (seed, step) batch order."""
  name: str
  data_dir: str
  objective: str
  batch_size: int
  eval_batch_size: int
  seed: int
  cfg: dict
  tokenizer: Tokenizer = None
  tokenizer_info: dict = None
  lengths: dict = None           # feature -> row length
  train_size: int = 0            # packed training rows
  _train: tuple = None           # (stream, piece start, piece length, row_ptr, items)
  _eval_plan: tuple = None       # the same for the eval split
  _eval: list | None = None      # the eval batches, made once
  _perm: tuple = (None, None)    # (epoch, its permutation)

  @classmethod
  def from_config(cls, cfg, *, objective: str, batch_size: int, eval_batch_size: int,
                  seed: int) -> TextData:
    """`cfg` is `config.data` (fields: `config_defaults`); prepares what is missing."""
    if objective not in OBJECTIVES:
      raise ValueError(f'objective must be one of {OBJECTIVES}, got {objective!r}.')
    for field, size in (('batch_size', batch_size), ('eval_batch_size', eval_batch_size)):
      if size % jax.process_count():
        raise ValueError(f'{field} {size} must be divisible by {jax.process_count()} processes.')
    c = config_defaults(objective)
    unknown = sorted(set(cfg.keys()) - set(c))
    if unknown:
      raise ConfigError(f'unknown field for {objective} text data; accepted: {sorted(c)}.',
                        field=f'config.data.{unknown[0]}')
    c.update({k: cfg[k] for k in cfg.keys() if cfg[k] is not None})
    data_dir = text_corpus.ensure_text_prepared(
        c['name'], c['data_dir'] or text_corpus.prepare.default_data_dir(),
        check_sources=c['check_sources'], download=c['download'])
    self = cls(name=c['name'], data_dir=data_dir, objective=objective, batch_size=batch_size,
               eval_batch_size=eval_batch_size, seed=seed, cfg=c)
    self._setup()
    return self

  # ---------------------------------------------------------------- preparation
  def _setup(self):
    c = self.cfg
    ident = dataset_identity(self.name, self.data_dir)
    cache = cache_dir(self.name, self.data_dir, c['cache_dir'])
    self.tokenizer = load_or_train_tokenizer(self.name, self.data_dir, c, ident, cache)
    self.tokenizer_info = {**self.tokenizer.info(), 'dataset': ident['dataset'],
                           'dataset_checksum': ident['checksum'], 'trained_on': c['train_split']}
    if 'packages' in ident:
      self.tokenizer_info['packages'] = ident['packages']
    train = tokenize_split(self.name, self.data_dir, c['train_split'], self.tokenizer, c, ident,
                           cache, c['max_train_tokens'])
    evals = tokenize_split(self.name, self.data_dir, c['eval_split'], self.tokenizer, c, ident,
                           cache, c['max_eval_tokens'])
    self.tokenizer_info['tokens'] = {c['train_split']: train.num_tokens,
                                     c['eval_split']: evals.num_tokens}
    if self.objective == 'causal_lm':
      self.lengths = {'targets': int(c['seq_len'])}
    else:
      density, mean = c['noise_density'], c['mean_noise_span_length']
      raw, targets = obj.raw_length_for(c['inputs_length'], density, mean)
      targets = int(c['targets_length'] or targets)
      # A shorter targets length than T5's formula gives shortens the raw segments too.
      while raw > 2 and obj.corrupted_lengths(raw, density, mean)[1] > targets:
        raw -= 1
      self.lengths = {'inputs': int(c['inputs_length']), 'targets': targets, 'raw': raw}
    self._train = self._plan(train, self.seed)
    self.train_size = len(self._train[3]) - 1
    if self.train_size < self.batch_size:
      raise ValueError(f'train split {c["train_split"]!r} packs into {self.train_size} rows, '
                       f'fewer than batch_size {self.batch_size}.')
    self._eval_plan = self._plan(evals, c['eval_seed'])

  def _plan(self, split: Split, seed: int) -> tuple:
    """Pieces and their packing into rows, fixed for the run (order drawn from `seed`)."""
    eos = self.tokenizer.eos_id
    if self.objective == 'causal_lm':
      # EOS after every document, so the model learns where documents end.
      stream = np.insert(split.tokens, split.starts[1:], eos).astype(np.int32)
      starts = split.starts + np.arange(len(split.starts))
      start, length = chunk_documents(starts, self.lengths['targets'], min_length=2)
      sizes = length[:, None]
      capacity = [self.lengths['targets']]
    else:
      stream = split.tokens
      start, length = chunk_documents(split.starts, self.lengths['raw'], min_length=2)
      table = np.array([(0, 0), (0, 0)] + [
          obj.corrupted_lengths(n, self.cfg['noise_density'], self.cfg['mean_noise_span_length'])
          for n in range(2, self.lengths['raw'] + 1)])
      sizes = table[length]
      capacity = [self.lengths['inputs'], self.lengths['targets']]
    order = np.random.default_rng([seed, _PLAN]).permutation(len(start))
    row_ptr, items = pack_plan(sizes[order], capacity, pack=self.cfg['pack'])
    return stream, start, length, row_ptr, order[items]

  # ---------------------------------------------------------------- batches
  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def train_token_counts(self) -> np.ndarray:
    """[vocab_size] int64: occurrences of every id in the training split's token stream
    (causal LM: with the EOS after each document), e.g. for frequency-balanced hash tables."""
    return np.bincount(self._train[0], minlength=self.vocab_size)[:self.vocab_size]

  @property
  def steps_per_epoch(self) -> int:
    return self.train_size // self.batch_size

  @property
  def local_batch_size(self) -> int:
    return self.batch_size // jax.process_count()

  def position(self, step: int) -> dict:
    """The data position to checkpoint: the next batch is a function of these alone."""
    return {'seed': self.seed, 'next_step': int(step), 'steps_per_epoch': self.steps_per_epoch,
            'rows': self.train_size, 'dataset_checksum': self.tokenizer_info['dataset_checksum'],
            'tokenizer_sha256': self.tokenizer.sha256}

  def _rows(self, plan: tuple, rows: np.ndarray, noise_keys: list) -> dict:
    """The batch made of packed `rows` of `plan`; row -1 is padding."""
    stream, start, length, row_ptr, items = plan
    pieces = [[stream[start[i]:start[i] + length[i]] for i in items[row_ptr[r]:row_ptr[r + 1]]]
              if r >= 0 else [] for r in rows]
    if self.objective == 'causal_lm':
      targets, seg, pos = pack_rows(pieces, self.lengths['targets'])
      return {'tokens': obj.shift_right(targets, seg), 'targets': targets, 'segment_ids': seg,
              'positions': pos, 'weights': (seg > 0).astype(np.float32)}
    ins, tgs = [], []
    for row, key in zip(pieces, noise_keys):
      rng = np.random.default_rng(key)
      pairs = [obj.span_corrupt(p, obj.random_spans_noise_mask(
          len(p), rng, self.cfg['noise_density'], self.cfg['mean_noise_span_length']),
                                self.vocab_size, self.tokenizer.eos_id) for p in row]
      ins.append([a for a, _ in pairs])
      tgs.append([b for _, b in pairs])
    inputs, iseg, ipos = pack_rows(ins, self.lengths['inputs'])
    targets, tseg, tpos = pack_rows(tgs, self.lengths['targets'])
    return {'inputs': inputs, 'input_segment_ids': iseg, 'input_positions': ipos,
            'decoder_inputs': obj.shift_right(targets, tseg), 'targets': targets,
            'target_segment_ids': tseg, 'target_positions': tpos,
            'weights': (tseg > 0).astype(np.float32)}

  def train_batch(self, step: int) -> dict:
    """This process's rows of global batch `step`, a pure function of (seed, step)."""
    epoch, i = divmod(int(step), self.steps_per_epoch)
    if self._perm[0] != epoch:
      rng = np.random.default_rng([self.seed, _EPOCH, epoch])
      self._perm = (epoch, rng.permutation(self.train_size))
    lo = i * self.batch_size + jax.process_index() * self.local_batch_size
    rows = self._perm[1][lo:lo + self.local_batch_size]
    first = jax.process_index() * self.local_batch_size
    keys = [[self.seed, _NOISE, int(step), first + j] for j in range(len(rows))]
    return self._rows(self._train, rows, keys)

  def train_iterator(self, start_step: int = 0) -> Iterator[tuple[int, dict]]:
    """Yields (step, batch) from `start_step` on, forever."""
    step = int(start_step)
    while True:
      yield step, self.train_batch(step)
      step += 1

  def eval_batches(self) -> Iterator[dict]:
    """The eval rows (all, or the first config.data.eval_max_rows) in fixed-size batches;
    the last batch padded with empty rows. Each process yields its rows of each batch."""
    if self._eval is None:
      total = len(self._eval_plan[3]) - 1
      if self.cfg['eval_max_rows']:
        total = min(total, int(self.cfg['eval_max_rows']))
      size, local = self.eval_batch_size, self.eval_batch_size // jax.process_count()
      self._eval = []
      first = jax.process_index() * local
      for lo in range(0, total, size):
        rows = np.arange(lo + first, lo + first + local)
        keys = [[self.cfg['eval_seed'], _NOISE, int(r)] for r in rows]
        self._eval.append(self._rows(self._eval_plan, np.where(rows < total, rows, -1), keys))
    yield from self._eval

"""A SentencePiece unigram vocabulary with T5's id layout, trained where the data is.

    ids 0 <pad>, 1 </s> (EOS), 2 <unk>, 3..258 the 256 byte pieces, then word pieces;
    the last `num_extra_ids` ids are the sentinels, <extra_id_0> = vocab_size - 1.

As T5 and seqio, there is no BOS and the sentinels live outside the SentencePiece
model (seqio's `extra_ids`), so `vocab_size` = SentencePiece pieces + unused ids (if
the corpus was too small for the requested size) + sentinels. Byte fallback spells any
character the vocabulary lacks as UTF-8 bytes, so no text becomes <unk>.

Training is deterministic: a fixed SentencePiece random seed and one thread give a
byte-identical model for the same input (same library version).
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from typing import Iterable, Iterator

import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
NUM_EXTRA_IDS = 100             # T5's sentinel count
SEED = 1234
RECIPE = 1                      # bump when the training options change: names new cache files


def sha256_of(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


class Tokenizer:
  """encode(str) -> list[int]; decode(list[int]) -> str; T5 ids (see module doc)."""

  def __init__(self, model_path: str, vocab_size: int | None = None,
               num_extra_ids: int = NUM_EXTRA_IDS):
    """model_path: a SentencePiece model; vocab_size: the model vocabulary (default:
    pieces + num_extra_ids)."""
    with open(model_path, 'rb') as f:
      proto = f.read()
    self.path = os.fspath(model_path)
    self.sha256 = hashlib.sha256(proto).hexdigest()
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    self.num_pieces = self._sp.get_piece_size()
    self.num_extra_ids = num_extra_ids
    self.vocab_size = vocab_size or self.num_pieces + num_extra_ids
    if self.vocab_size < self.num_pieces + num_extra_ids:
      raise ValueError(f'{model_path} has {self.num_pieces} pieces: vocab_size {self.vocab_size} '
                       f'leaves no room for {num_extra_ids} sentinels.')
    if (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id()) != (PAD_ID, EOS_ID, UNK_ID):
      raise ValueError(f'{model_path}: pad/eos/unk ids are {self._sp.pad_id()}/'
                       f'{self._sp.eos_id()}/{self._sp.unk_id()}, T5 needs 0/1/2.')
    self.pad_id, self.eos_id, self.unk_id = PAD_ID, EOS_ID, UNK_ID

  def sentinel(self, i: int) -> int:
    """The id of <extra_id_i>."""
    if not 0 <= i < self.num_extra_ids:
      raise ValueError(f'sentinel {i} out of range: there are {self.num_extra_ids}.')
    return self.vocab_size - 1 - i

  def encode(self, text: str) -> list[int]:
    """Text -> ids, no EOS. Sentinel strings in the text are ordinary text."""
    return self._sp.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self._sp.encode(texts, num_threads=1)

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> text; pad/EOS vanish, sentinels read <extra_id_i>, unused ids vanish."""
    out, run = [], []
    first_extra = self.vocab_size - self.num_extra_ids

    def flush():
      text = self._sp.decode(run)
      # SentencePiece drops the leading space of a text; after a sentinel it is real.
      if out and run and self._sp.id_to_piece(run[0]).startswith('\u2581'):
        text = ' ' + text
      out.append(text)
      run.clear()
    for i in (int(i) for i in ids):
      if i < self.num_pieces:
        run.append(i)
      elif i >= first_extra:
        flush()
        out.append(f'<extra_id_{self.vocab_size - 1 - i}>')
    flush()
    return ''.join(out)

  def piece(self, i: int) -> str:
    if i < self.num_pieces:
      return self._sp.id_to_piece(i)
    return f'<extra_id_{self.vocab_size - 1 - i}>' if i >= self.vocab_size - self.num_extra_ids else ''

  def info(self) -> dict:
    return {'path': self.path, 'sha256': self.sha256, 'vocab_size': self.vocab_size,
            'num_pieces': self.num_pieces, 'num_extra_ids': self.num_extra_ids,
            'model_type': 'unigram'}


def train_sentencepiece(sentences: Iterable[str], path: str, vocab_size: int, *,
                        num_extra_ids: int = NUM_EXTRA_IDS, max_sentences: int = 2_000_000,
                        character_coverage: float = 0.9995, seed: int = SEED) -> str:
  """Trains a unigram model with T5 ids on `sentences` and writes it to `path`.

  Args:
    sentences: training text, one line each (SentencePiece skips lines over 4192 bytes,
      so give lines, not documents).
    vocab_size: the model vocabulary including sentinels; SentencePiece gets
      vocab_size - num_extra_ids pieces, fewer (no error) if the text is too small.
    max_sentences: beyond this many lines SentencePiece samples (seeded) this many.
  Returns:
    the sha256 of the written model.
  """
  spm.set_random_generator_seed(seed)
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=writer, model_type='unigram',
      vocab_size=vocab_size - num_extra_ids, hard_vocab_limit=False,
      character_coverage=character_coverage, byte_fallback=True,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      input_sentence_size=max_sentences, shuffle_input_sentence=True,
      num_threads=1, minloglevel=2)
  proto = writer.getvalue()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # Write-then-rename: several processes may train the same model at once.
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix='.tmp')
  with os.fdopen(fd, 'wb') as f:
    f.write(proto)
  os.replace(tmp, path)
  return hashlib.sha256(proto).hexdigest()


def text_lines(texts: Iterable[str], max_chars: int | None = None) -> Iterator[str]:
  """Documents -> their non-blank lines (SentencePiece's unit of training text), stopping
  after the document that brings the total past `max_chars`."""
  total = 0
  for text in texts:
    for line in text.splitlines():
      if line.strip():
        yield line
    total += len(text)
    if max_chars and total >= max_chars:
      return

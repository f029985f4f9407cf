"""Prepared text, cached beside the TFDS data: the tokenizer and the tokenised splits.

    <data_dir>/<name>/<version>/moe_jax/
      spm_unigram_v4096_<recipe hash>.model     SentencePiece, trained on the train split
      tokens_<split>_<key>.npz                  tokens [T] int32, starts [D + 1] int64

A file's name is a hash of everything its contents depend on (the dataset's checksum,
the tokenizer's sha256 and options, the caps), so a cached file is always the right
one and nothing is ever silently reused for other data.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from moe_jax.data.tokenizer import RECIPE, Tokenizer, text_lines, train_sentencepiece


@dataclasses.dataclass
class Split:
  """A tokenised split: docs[i] = tokens[starts[i]:starts[i + 1]] (no EOS)."""
  tokens: np.ndarray       # [T] int32
  starts: np.ndarray       # [D + 1] int64

  @property
  def num_tokens(self) -> int:
    return len(self.tokens)


def _atomic_save(path: str, **arrays):
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.npz.tmp')
  with os.fdopen(fd, 'wb') as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def _texts(name, split, data_dir, text_key) -> Iterator[str]:
  ds = tfds.load(name, split=split, data_dir=data_dir, download=False, shuffle_files=False)
  for ex in tfds.as_numpy(ds):
    yield ex[text_key].decode('utf-8', errors='replace')


def cache_dir(name: str, data_dir: str, override: str | None = None) -> str:
  """Where tokenizers and token arrays live: beside the TFDS files unless overridden."""
  path = override or os.path.join(data_dir, tfds.builder(name, data_dir=data_dir).info.full_name,
                                  'moe_jax')
  os.makedirs(path, exist_ok=True)
  return path


def dataset_identity(name: str, data_dir: str) -> dict:
  """{'dataset': name:version, 'checksum': ...}: debian_docs' manifest checksum, else a hash
  of TFDS's own split metadata (example and byte counts)."""
  builder = tfds.builder(name, data_dir=data_dir)
  ident = {'dataset': f'{builder.name}:{builder.version}'}
  manifest = dict(builder.info.metadata or {}).get('manifest') if builder.is_prepared() else None
  if manifest:
    ident.update(checksum=manifest['checksum'], packages=manifest['packages'])
  else:
    splits = {k: [v.num_examples, v.num_bytes] for k, v in sorted(builder.info.splits.items())}
    ident['checksum'] = hashlib.sha256(json.dumps([ident['dataset'], splits]).encode()).hexdigest()
  return ident


def load_or_train_tokenizer(name: str, data_dir: str, c: dict, ident: dict, cache: str) -> Tokenizer:
  """config.data.tokenizer_path if set, else the cached model trained on the train split."""
  if c['tokenizer_path']:
    return Tokenizer(c['tokenizer_path'], c['vocab_size'], c['num_extra_ids'])
  # Everything the model depends on names its file, so a cached model is the right one.
  recipe = [RECIPE, c['vocab_size'], c['num_extra_ids'], c['train_split'], c['text_key'],
            c['tokenizer_max_chars'], c['tokenizer_max_sentences'], ident['checksum']]
  key = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:12]
  path = os.path.join(cache, f'spm_unigram_v{c["vocab_size"]}_{key}.model')
  if not os.path.exists(path):
    texts = _texts(name, c['train_split'], data_dir, c['text_key'])
    train_sentencepiece(text_lines(texts, c['tokenizer_max_chars']), path,
                        c['vocab_size'], num_extra_ids=c['num_extra_ids'],
                        max_sentences=c['tokenizer_max_sentences'])
  return Tokenizer(path, c['vocab_size'], c['num_extra_ids'])


def tokenize_split(name: str, data_dir: str, split: str, tokenizer: Tokenizer, c: dict,
                   ident: dict, cache: str, max_tokens: int | None = None) -> Split:
  """The split as one flat int32 array (cached), documents in TFDS's reading order."""
  key = hashlib.sha256(json.dumps([ident['checksum'], split, c['text_key'], tokenizer.sha256,
                                   max_tokens]).encode()).hexdigest()[:16]
  path = os.path.join(cache, f'tokens_{split.replace("/", "_")}_{key}.npz')
  if os.path.exists(path):
    with np.load(path) as f:
      return Split(f['tokens'], f['starts'])
  chunks, sizes, total, batch = [], [], 0, []

  def flush():
    nonlocal total, batch
    for ids in tokenizer.encode_batch(batch):
      chunks.append(np.asarray(ids, np.int32))
      sizes.append(len(ids))
      total += len(ids)
    batch = []
  for text in _texts(name, split, data_dir, c['text_key']):
    batch.append(text)
    if len(batch) == 256:
      flush()
      if max_tokens and total >= max_tokens:
        break
  flush()
  tokens = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
  starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
  _atomic_save(path, tokens=tokens, starts=starts)
  return Split(tokens, starts)

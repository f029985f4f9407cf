"""Prepare a text dataset for offline training: TFDS copy, tokenizers, token arrays.

    python -m moe_jax.data.text_prepare                       # debian_docs, vocab 4096 and 8192
    python -m moe_jax.data.text_prepare --reprepare           # after a package update
    python -m moe_jax.data.text_prepare --name=lm1b --splits=train,test --vocab_sizes=8192

Prints the corpus (files and bytes per split, from the manifest), the tokens per split
for every vocabulary, and how long each stage took. Anything already prepared is
reused, so running it twice costs seconds.
"""
from __future__ import annotations

import argparse
import time

from moe_jax.data import text_corpus
from moe_jax.data.prepare import MissingDataError
from moe_jax.data.text import config_defaults
from moe_jax.data.text_cache import (cache_dir, dataset_identity, load_or_train_tokenizer,
                                     tokenize_split)


def prepare_text(name: str = text_corpus.NAME, data_dir: str | None = None, *,
                 vocab_sizes=(4096, 8192), splits=text_corpus.SPLITS, reprepare: bool = False,
                 check_sources: bool = True, log=print) -> dict:
  """Prepares everything TextData needs for each vocabulary; returns the figures."""
  t0 = time.perf_counter()
  data_dir = text_corpus.ensure_text_prepared(name, data_dir, reprepare=reprepare,
                                              check_sources=check_sources)
  t_corpus = time.perf_counter() - t0
  ident = dataset_identity(name, data_dir)
  report = {'dataset': ident['dataset'], 'data_dir': data_dir, 'checksum': ident['checksum'],
            'prepare_seconds': round(t_corpus, 1), 'vocab': {}}
  manifest = text_corpus.stored_manifest(data_dir) if name.split(':')[0] == text_corpus.NAME else None
  if manifest:
    report.update(packages=manifest['packages'], files=manifest['files'], bytes=manifest['bytes'],
                  splits=manifest['splits'])
    log(f'{ident["dataset"]} in {data_dir}: {manifest["files"]} files, {manifest["bytes"]:,} bytes, '
        f'packages {manifest["packages"]}, checksum {ident["checksum"][:12]} ({t_corpus:.1f} s)')
    for s, v in manifest['splits'].items():
      log(f'  {s:>10}: {v["files"]:5d} files {v["bytes"]:>12,} bytes')
  cache = cache_dir(name, data_dir)
  for vocab in vocab_sizes:
    c = {**config_defaults('causal_lm'), 'name': name, 'vocab_size': int(vocab)}
    t = time.perf_counter()
    tok = load_or_train_tokenizer(name, data_dir, c, ident, cache)
    entry = {'tokenizer_seconds': round(time.perf_counter() - t, 1), 'sha256': tok.sha256,
             'path': tok.path, 'num_pieces': tok.num_pieces, 'tokens': {}, 'tokenize_seconds': {}}
    for s in splits:
      t = time.perf_counter()
      # The caps TextData uses, so that it finds these arrays in the cache.
      cap = c['max_train_tokens'] if s == c['train_split'] else c['max_eval_tokens']
      split = tokenize_split(name, data_dir, s, tok, c, ident, cache, cap)
      entry['tokens'][s] = split.num_tokens
      entry['tokenize_seconds'][s] = round(time.perf_counter() - t, 1)
    report['vocab'][int(vocab)] = entry
    log(f'vocab {vocab}: {tok.path} sha256 {tok.sha256[:12]} ({entry["tokenizer_seconds"]} s); tokens '
        + ', '.join(f'{s} {n:,} ({entry["tokenize_seconds"][s]} s)' for s, n in entry['tokens'].items()))
  return report


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--name', default=text_corpus.NAME)
  p.add_argument('--data_dir', default=None,
                 help='TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)')
  p.add_argument('--vocab_sizes', default='4096,8192')
  p.add_argument('--splits', default=','.join(text_corpus.SPLITS))
  p.add_argument('--reprepare', action='store_true', help='delete the prepared copy and prepare again')
  p.add_argument('--no_check_sources', action='store_true',
                 help='use a prepared copy even if the installed files changed since')
  args = p.parse_args(argv)
  try:
    prepare_text(args.name, args.data_dir, vocab_sizes=[int(v) for v in args.vocab_sizes.split(',')],
                 splits=args.splits.split(','), reprepare=args.reprepare,
                 check_sources=not args.no_check_sources)
  except (MissingDataError, text_corpus.ManifestMismatchError) as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  main()

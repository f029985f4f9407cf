"""debian_docs: the registered TFDS builder on a tiny corpus, hash splits, manifest, errors."""
import gzip
import hashlib
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from moe_jax.data import text_corpus
from moe_jax.data.prepare import MissingDataError

from tiny_text_corpus import SPLIT_WEIGHTS, sources_for, write_corpus


def _read_source(path):
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rt', encoding='utf-8') as f:
    return f.read()


def test_split_of_is_a_path_hash():
  """Bucket = first 8 bytes of sha256(path), big-endian, mod 100: 0-97 train, 98 validation."""
  keys = [f'pkg/dir{i % 13}/file{i}.rst' for i in range(20000)]
  got = [text_corpus.split_of(k) for k in keys]
  for k, s in zip(keys[:200], got):
    bucket = int(hashlib.sha256(k.encode()).hexdigest()[:16], 16) % 100
    assert s == ('train' if bucket < 98 else 'validation' if bucket == 98 else 'test')
  fractions = [got.count(s) / len(got) for s in text_corpus.SPLITS]
  np.testing.assert_allclose(fractions, [0.98, 0.01, 0.01], atol=0.003)


def test_builder_reads_every_file_once_through_tfds_load(tiny_corpus):
  sources, data_dir = tiny_corpus
  files = dict(text_corpus.list_files(sources))
  assert not any('translations' in k for k in files) and any(k.endswith('.gz') for k in files)
  seen = {}
  for split in text_corpus.SPLITS:
    for ex in tfds.as_numpy(tfds.load('debian_docs', split=split, data_dir=data_dir)):
      key = ex['path'].decode()
      assert key not in seen and text_corpus.split_of(key, SPLIT_WEIGHTS) == split
      seen[key] = ex['text'].decode()
  assert seen.keys() == files.keys()
  for key, path in files.items():
    assert seen[key] == _read_source(path)


def test_manifest_counts_files_bytes_and_checksum(tiny_corpus):
  sources, data_dir = tiny_corpus
  m = text_corpus.stored_manifest(data_dir)
  files = text_corpus.list_files(sources)
  assert m['files'] == len(files) == sum(v['files'] for v in m['splits'].values())
  assert m['bytes'] == sum(len(_read_source(p).encode()) for _, p in files)
  assert m['packages'] == {'no-such-package': None}
  assert text_corpus.installed_checksum(m) == m['checksum']
  text_corpus.check_manifest(data_dir)            # unchanged sources: no error


def test_changed_sources_are_detected_not_mixed(tmp_path):
  root = str(tmp_path / 'src')
  write_corpus(root)
  data_dir = str(tmp_path / 'tfds')
  text_corpus.DebianDocs(sources=sources_for(root), split_weights=SPLIT_WEIGHTS,
                         data_dir=data_dir).download_and_prepare()
  before = text_corpus.stored_manifest(data_dir)['checksum']
  with open(os.path.join(root, 'howto', 'argparse.rst.txt'), 'a') as f:
    f.write('A new paragraph from a package update.\n')
  with pytest.raises(text_corpus.ManifestMismatchError) as e:
    text_corpus.ensure_text_prepared('debian_docs', data_dir)
  assert '--reprepare' in str(e.value) and 'check_sources=False' in str(e.value)
  assert '1 changed, 0 added, 0 removed (e.g. tiny/howto/argparse.rst.txt)' in str(e.value)
  # The user may keep the old copy deliberately ...
  assert text_corpus.ensure_text_prepared('debian_docs', data_dir, check_sources=False) == data_dir
  # ... or re-prepare: a new checksum, which every run records.
  text_corpus.ensure_text_prepared('debian_docs', data_dir, sources=sources_for(root), reprepare=True)
  after = text_corpus.stored_manifest(data_dir)['checksum']
  assert after != before
  text_corpus.check_manifest(data_dir)
  # A prepared copy moved away from its sources is used as it is.
  shutil.rmtree(root)
  text_corpus.check_manifest(data_dir)


def test_missing_text_names_both_remedies(tmp_path, monkeypatch):
  monkeypatch.setattr(text_corpus, 'DEFAULT_SOURCES', sources_for(str(tmp_path / 'none')))
  with pytest.raises(MissingDataError) as e:
    text_corpus.ensure_text_prepared('debian_docs', str(tmp_path / 'tfds'))
  msg = str(e.value)
  assert 'make data' in msg and 'apt-get install -y python3.11-doc linux-doc-6.1' in msg
  assert 'network' in msg and 'lm1b' in msg and str(tmp_path / 'tfds') in msg


def test_missing_networked_dataset_points_to_debian_docs(tmp_path, monkeypatch):
  monkeypatch.setattr(text_corpus.prepare, 'network_available', lambda *a, **k: False)
  with pytest.raises(MissingDataError) as e:
    text_corpus.ensure_text_prepared('lm1b', str(tmp_path / 'tfds'))
  assert 'network' in str(e.value) and 'debian_docs' in str(e.value)

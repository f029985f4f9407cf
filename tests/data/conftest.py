"""Fixtures for the text tests: the tiny corpus of `tiny_text_corpus.py`, prepared once."""
import importlib

import pytest

from tiny_text_corpus import MODULES, SPLIT_WEIGHTS, sources_for, write_corpus


@pytest.fixture(scope='session')
def doc_lines():
  """The non-blank lines of the corpus' docstrings (tokenizer training text)."""
  return [line for mod in MODULES for line in (importlib.import_module(mod).__doc__ or '').splitlines()
          if line.strip()]


@pytest.fixture(scope='session')
def tiny_corpus(tmp_path_factory):
  """(sources, data_dir): the tiny corpus prepared as debian_docs, and its TFDS dir."""
  import tensorflow_datasets as tfds
  from moe_jax.data import text_corpus
  tfds.disable_progress_bar()
  base = tmp_path_factory.mktemp('tiny_corpus')
  write_corpus(str(base / 'src'))
  sources = sources_for(str(base / 'src'))
  data_dir = str(base / 'tfds')
  text_corpus.DebianDocs(sources=sources, split_weights=SPLIT_WEIGHTS,
                         data_dir=data_dir).download_and_prepare()
  return sources, data_dir

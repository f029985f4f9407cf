"""A tiny real-English corpus: the docstrings of stdlib modules, written as reST files.

The tests need no Debian packages: `text_corpus.Source` points the builder at files
written here, one of them gzipped and one under an excluded directory, like the real
sources.
"""
import gzip
import importlib
import os

MODULES = ('argparse', 'ast', 'asyncio', 'base64', 'bisect', 'calendar', 'collections', 'contextlib',
           'copy', 'csv', 'dataclasses', 'datetime', 'decimal', 'difflib', 'email', 'enum', 'fnmatch',
           'fractions', 'functools', 'gzip', 'heapq', 'hashlib', 'inspect', 'io', 'json', 'logging',
           'os', 'pathlib', 'pickle', 'pprint', 'random', 're', 'shutil', 'socket', 'string',
           'subprocess', 'tempfile', 'textwrap', 'threading', 'typing', 'unittest', 'zipfile')
SPLIT_WEIGHTS = (6, 2, 2)
VOCAB = 512


def write_corpus(root: str) -> list[str]:
  """Writes one file per module docstring (a .gz among them); returns the keys' names."""
  names = []
  for i, mod in enumerate(MODULES):
    doc = importlib.import_module(mod).__doc__ or mod
    text = f'{doc.strip()}\n\nThis is document {i}, about the {mod} module.\n'
    name = f'{mod}.rst.gz' if i % 7 == 3 else f'{mod}.rst.txt'
    sub = os.path.join(root, 'library' if i % 2 else 'howto')
    os.makedirs(sub, exist_ok=True)
    opener = gzip.open if name.endswith('.gz') else open
    with opener(os.path.join(sub, name), 'wt', encoding='utf-8') as f:
      f.write(text)
    names.append(os.path.join(os.path.basename(sub), name))
  os.makedirs(os.path.join(root, 'translations'), exist_ok=True)
  with open(os.path.join(root, 'translations', 'skipped.rst.txt'), 'w') as f:
    f.write('Ceci n’est pas en anglais.')
  return names


def sources_for(root: str):
  from moe_jax.data.text_corpus import Source
  return (Source('tiny', root, '**/*.rst.*', 'no-such-package', exclude=('translations/',)),)



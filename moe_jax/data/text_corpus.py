"""`debian_docs`: real English text that installs offline, as a registered TFDS dataset.

The reST sources of the Python 3.11 documentation (`python3.11-doc`) and of the Linux
6.1 documentation (`linux-doc-6.1`, without its translations/ directory), about 3,300
files and 32 MB of technical English with code, one example per file:

    {'text': the file's text, 'path': 'python3.11/library/os.rst.txt'}

Each file goes to train / validation / test by a hash of its path (98/1/1), never by
listing order, so adding a file moves no other file. The prepared copy carries a
manifest (packages and versions, files, bytes, one checksum over every file's path,
split, size and sha256) in its TFDS metadata. A package update changes the checksum:
`ensure_text_prepared` then stops with an error rather than mix two corpora, and every
run records the checksum (`TextData.tokenizer_info`).

Reading always goes through `tfds.load('debian_docs', data_dir=...)`; on a networked
machine `lm1b`, `c4/en:3.1.0` or `wiki40b/en` take its place (same 'text' feature).
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import os
import shutil
import subprocess
from typing import Iterator, Sequence

import tensorflow_datasets as tfds

from moe_jax.data import prepare
from moe_jax.data.prepare import MissingDataError

NAME = 'debian_docs'
PACKAGES = ('python3.11-doc', 'linux-doc-6.1')
APT_COMMAND = 'sudo apt-get install -y ' + ' '.join(PACKAGES)
SPLITS = ('train', 'validation', 'test')
SPLIT_WEIGHTS = (98, 1, 1)
NETWORKED_NAMES = ('lm1b', 'c4/en:3.1.0', 'wiki40b/en')


@dataclasses.dataclass(frozen=True)
class Source:
  """Files `root`/`pattern` (minus paths starting with an `exclude` entry) of a package;
  example keys are `prefix`/<path under root>."""
  prefix: str
  root: str
  pattern: str
  package: str
  exclude: tuple[str, ...] = ()


DEFAULT_SOURCES = (
    Source('python3.11', '/usr/share/doc/python3.11/html/_sources', '**/*.rst.txt', 'python3.11-doc'),
    Source('linux-doc-6.1', '/usr/share/doc/linux-doc-6.1/Documentation', '**/*.rst.gz',
           'linux-doc-6.1', exclude=('translations/',)),   # not English
)


class ManifestMismatchError(RuntimeError):
  """The installed source files differ from those the prepared copy was built from."""


def split_of(key: str, weights: Sequence[int] = SPLIT_WEIGHTS) -> str:
  """The split of a file, from the first 8 bytes of sha256(key) modulo sum(weights)."""
  bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], 'big') % sum(weights)
  for split, bound in zip(SPLITS, [sum(weights[:i + 1]) for i in range(len(weights))]):
    if bucket < bound:
      return split
  raise AssertionError('unreachable')


def list_files(sources: Sequence[Source]) -> list[tuple[str, str]]:
  """[(key, path)] of every source file, sorted by key; [] when nothing is installed."""
  out = []
  for s in sources:
    for path in glob.glob(os.path.join(s.root, s.pattern), recursive=True):
      rel = os.path.relpath(path, s.root)
      if os.path.isfile(path) and not any(rel.startswith(e) for e in s.exclude):
        out.append((f'{s.prefix}/{rel}', path))
  return sorted(out)


def read_text(path: str) -> str:
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    return f.read().decode('utf-8', errors='replace')


def package_versions(packages: Sequence[str]) -> dict[str, str | None]:
  """Installed Debian versions (None: not installed or no dpkg)."""
  out = {}
  for p in packages:
    try:
      r = subprocess.run(['dpkg-query', '-W', '-f=${Version}', p], capture_output=True, text=True,
                         timeout=30)
      out[p] = r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
      out[p] = None
  return out


def _file_lines(files, weights) -> Iterator[tuple[str, str, int, str, str]]:
  """(key, split, size, sha256, path) per file: the rows the checksum covers."""
  for key, path in files:
    with open(path, 'rb') as f:
      raw = f.read()
    yield key, split_of(key, weights), len(raw), hashlib.sha256(raw).hexdigest(), path


def _checksum(rows) -> str:
  return hashlib.sha256(''.join(f'{k}\t{s}\t{n}\t{h}\n' for k, s, n, h, *_ in rows).encode()).hexdigest()


def build_manifest(sources: Sequence[Source], weights: Sequence[int] = SPLIT_WEIGHTS) -> dict:
  """Everything that identifies the corpus, with per-split file and text-byte counts."""
  rows = list(_file_lines(list_files(sources), weights))
  splits = {s: {'files': 0, 'bytes': 0} for s in SPLITS}
  files = []
  for key, split, size, digest, path in rows:
    text_bytes = len(read_text(path).encode())
    splits[split]['files'] += 1
    splits[split]['bytes'] += text_bytes
    files.append([key, split, size, digest])
  return {
      'format': 1,
      'sources': [dataclasses.asdict(s) for s in sources],
      'split_weights': list(weights),
      'packages': package_versions(sorted({s.package for s in sources})),
      'files': len(rows),
      'bytes': sum(v['bytes'] for v in splits.values()),
      'splits': splits,
      'checksum': _checksum(rows),
      'file_list': files,
  }


def sources_from(manifest: dict) -> tuple[Source, ...]:
  """The sources a prepared copy was built from."""
  return tuple(Source(**{**s, 'exclude': tuple(s['exclude'])}) for s in manifest['sources'])


def installed_rows(manifest: dict) -> list[tuple] | None:
  """(key, split, size, sha256, path) of the files now installed where `manifest`'s
  sources were; None if none is (the prepared copy was moved to another machine)."""
  files = list_files(sources_from(manifest))
  return list(_file_lines(files, manifest['split_weights'])) if files else None


def installed_checksum(manifest: dict) -> str | None:
  rows = installed_rows(manifest)
  return _checksum(rows) if rows is not None else None


def _differences(manifest: dict, rows: list[tuple]) -> str:
  """'2 changed, 1 added, 0 removed (e.g. a/b.rst)' between the manifest and `rows`."""
  then = {k: tuple(v) for k, *v in manifest['file_list']}
  now = {k: tuple(v) for k, *v in (r[:4] for r in rows)}
  changed = [k for k in then.keys() & now.keys() if then[k] != now[k]]
  added, removed = now.keys() - then.keys(), then.keys() - now.keys()
  example = sorted(changed or added or removed)[:1]
  return (f'{len(changed)} changed, {len(added)} added, {len(removed)} removed'
          + (f' (e.g. {example[0]})' if example else ''))


class DebianDocs(tfds.core.GeneratorBasedBuilder):
  """Debian's reST documentation as a text dataset (see the module doc)."""
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'python3.11-doc + linux-doc-6.1 reST (no translations), 98/1/1 by path hash.'}

  def __init__(self, *, sources: Sequence[Source] | None = None,
               split_weights: Sequence[int] = SPLIT_WEIGHTS, **kwargs):
    """sources / split_weights matter when preparing only (reading uses the prepared files)."""
    self._sources = tuple(sources or DEFAULT_SOURCES)
    self._weights = tuple(split_weights)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(),
                                             'path': tfds.features.Text()}),
        metadata=tfds.core.MetadataDict(),
        homepage='https://packages.debian.org/bookworm/python3.11-doc',
        license='PSF-2.0 (Python docs); GPL-2.0 (Linux docs)')

  def _split_generators(self, dl_manager):
    del dl_manager   # everything is local
    manifest = build_manifest(self._sources, self._weights)
    if not manifest['files']:
      raise MissingDataError(f'no {NAME} source files under '
                             f'{", ".join(s.root for s in self._sources)}. ' + remedies())
    empty = [s for s in SPLITS if not manifest['splits'][s]['files']]
    if empty:
      raise ValueError(f'{NAME}: no file hashes into split(s) {empty} '
                       f'({manifest["files"]} files, weights {self._weights}).')
    self.info.metadata['manifest'] = manifest
    by_split = {s: [] for s in SPLITS}
    paths = dict(list_files(self._sources))
    for key, split, *_ in manifest['file_list']:
      by_split[split].append((key, paths[key]))
    return {s: self._generate_examples(files) for s, files in by_split.items()}

  def _generate_examples(self, files):
    for key, path in files:
      yield key, {'text': read_text(path), 'path': key}


def remedies(data_dir: str | None = None) -> str:
  where = f' into {data_dir}' if data_dir else ''
  return (f'Either (1) install the text and prepare it: `make data` (as root it runs apt), or '
          f'`{APT_COMMAND}` then `python -m moe_jax.data.text_prepare`{where}; or (2) on a machine '
          f'with network access use a TFDS text dataset, e.g. --config.data.name=lm1b '
          f'(or {", ".join(repr(n) for n in NETWORKED_NAMES[1:])}; lm1b has no validation split: '
          f"--config.data.eval_split=test).")


def stored_manifest(data_dir: str) -> dict | None:
  """The manifest of the prepared copy in `data_dir`, None if none is prepared."""
  builder = tfds.builder(NAME, data_dir=data_dir)
  if not builder.is_prepared():
    return None
  return dict(builder.info.metadata).get('manifest')


def check_manifest(data_dir: str) -> None:
  """Raises ManifestMismatchError if the sources the prepared copy came from changed."""
  manifest = stored_manifest(data_dir)
  if manifest is None:
    raise ManifestMismatchError(f'{NAME} in {data_dir} has no manifest; re-prepare it: '
                                '`python -m moe_jax.data.text_prepare --reprepare`.')
  rows = installed_rows(manifest)
  now = _checksum(rows) if rows is not None else None
  if now is not None and now != manifest['checksum']:
    then = manifest['packages']
    versions = package_versions(list(then))
    raise ManifestMismatchError(
        f'the {NAME} copy in {data_dir} was prepared from {then} (checksum '
        f'{manifest["checksum"][:12]}), but the installed files now differ ({versions}, checksum '
        f'{now[:12]}; files: {_differences(manifest, rows)}); results from the two would not '
        f'be comparable. Either re-prepare from the '
        f'installed files (new checksum, new tokenizer): `python -m moe_jax.data.text_prepare '
        f'--reprepare`, or keep the prepared copy as it is: reinstall the versions above, or set '
        f'config.data.check_sources=False.')


def ensure_text_prepared(name: str = NAME, data_dir: str | None = None, *,
                         sources: Sequence[Source] | None = None,
                         split_weights: Sequence[int] | None = None, reprepare: bool = False,
                         check_sources: bool = True, download: bool = True) -> str:
  """Makes `tfds.load(name, data_dir=...)` readable; returns the data dir.

  debian_docs: prepared from `sources` (default: the Debian packages) when missing; with
  `reprepare` the prepared copy is deleted and prepared again, by default from the
  sources and split weights its manifest records. An existing copy is checked against
  its sources (`check_manifest`). Other names go
  through `prepare.ensure_prepared` (TFDS download when the network answers).
  """
  data_dir = data_dir or prepare.default_data_dir()
  if name.split(':')[0] != NAME:
    try:
      return prepare.ensure_prepared(name, data_dir, download=download)
    except MissingDataError as e:
      raise MissingDataError(f'{e} Offline, use the Debian text instead: '
                             f'--config.data.name={NAME} after `make data`.') from None
  builder = tfds.builder(name, data_dir=data_dir)
  if reprepare and builder.is_prepared():
    old = stored_manifest(data_dir)
    if old:   # by default the same recipe, from the files installed now
      sources = sources or sources_from(old)
      split_weights = split_weights or tuple(old['split_weights'])
    shutil.rmtree(os.fspath(builder.data_path))   # the version dir, with tokenizers and caches
  if prepare.is_prepared(name, data_dir):
    if check_sources and tfds.builder(name, data_dir=data_dir).is_prepared():
      check_manifest(data_dir)
    return data_dir
  if not list_files(sources or DEFAULT_SOURCES):
    raise MissingDataError(f'TFDS dataset {name!r} is not prepared in {data_dir} and its source '
                           f'files are not installed. ' + remedies(data_dir))
  builder = DebianDocs(sources=sources, split_weights=split_weights or SPLIT_WEIGHTS,
                       data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return data_dir

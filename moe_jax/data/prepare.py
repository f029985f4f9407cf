"""Make a TFDS dataset readable offline: prepare fashion_mnist from local IDX files.

`ensure_prepared(name, data_dir, idx_dir)` leaves `<data_dir>/<name>/<version>` readable
by `tfds.load(name, data_dir=data_dir)`:

1. a prepared copy already there: nothing to do;
2. fashion_mnist with the IDX files in `idx_dir` (Debian's `dataset-fashion-mnist`
   installs them under /usr/share/datasets/fashion-mnist): the registered TFDS builder,
   fed the local files instead of its URLs, writes the same name, version and
   features TFDS itself would;
3. a reachable network: TFDS downloads and prepares as usual;
4. otherwise a `MissingDataError` that names both remedies.
"""
from __future__ import annotations

import gzip
import os
import socket
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

DEFAULT_IDX_DIR = '/usr/share/datasets/fashion-mnist'
IDX_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
APT_COMMAND = 'sudo apt-get install -y dataset-fashion-mnist'
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32,
               0x0E: np.float64}


class MissingDataError(RuntimeError):
  """The dataset is neither prepared, nor preparable from local files, nor downloadable."""


def default_data_dir() -> str:
  """TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.path.expanduser(os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets')


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (LeCun's MNIST format), gzipped or not, into an array.

  Header: two zero bytes, a type byte, the number of dimensions n, then n big-endian
  uint32 sizes; the data follow in row-major order, big-endian.
  """
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f'{path} is not an IDX file (bad magic number {raw[:4]!r}).')
  ndim = raw[3]
  shape = tuple(int(v) for v in np.frombuffer(raw, '>u4', count=ndim, offset=4))
  dtype = np.dtype(_IDX_DTYPES[raw[2]]).newbyteorder('>')
  data = np.frombuffer(raw, dtype, offset=4 + 4 * ndim)
  if data.size != int(np.prod(shape)):
    raise ValueError(f'{path}: header says {shape}, file holds {data.size} values.')
  return data.reshape(shape).astype(dtype.newbyteorder('='))


def find_idx_files(idx_dir: str) -> dict[str, tuple[str, str]] | None:
  """{'train': (images, labels), 'test': (...)} paths in `idx_dir`, or None if incomplete."""
  out = {}
  for split, names in IDX_FILES.items():
    paths = []
    for n in names:
      hits = [p for p in (os.path.join(idx_dir, n + '.gz'), os.path.join(idx_dir, n))
              if os.path.isfile(p)]
      if not hits:
        return None
      paths.append(hits[0])
    out[split] = tuple(paths)
  return out


class LocalFashionMnist(tfds.image_classification.FashionMNIST, skip_registration=True):
  """The registered fashion_mnist builder (same name, version, features) reading local IDX files."""
  name = 'fashion_mnist'

  def __init__(self, *, idx_files: dict[str, tuple[str, str]], limit: int | None = None, **kwargs):
    """idx_files: split -> (images, labels) paths; limit: keep the first n examples (tests)."""
    self._idx_files, self._limit = idx_files, limit
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    return [tfds.core.SplitGenerator(name=split, gen_kwargs=dict(images=img, labels=lab))
            for split, (img, lab) in self._idx_files.items()]

  def _generate_examples(self, images: str, labels: str) -> Iterator[tuple[int, dict]]:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (x.shape[0],):
      raise ValueError(f'unexpected Fashion-MNIST shapes: images {x.shape}, labels {y.shape}.')
    for i in range(x.shape[0] if self._limit is None else min(self._limit, x.shape[0])):
      yield i, {'image': x[i][..., None], 'label': int(y[i])}


def prepare_fashion_mnist(data_dir: str, idx_dir: str = DEFAULT_IDX_DIR) -> str:
  """Writes fashion_mnist into `data_dir` from the IDX files in `idx_dir`; returns its path."""
  files = find_idx_files(idx_dir)
  if files is None:
    raise MissingDataError(f'no Fashion-MNIST IDX files in {idx_dir}. ' + _remedies('fashion_mnist', data_dir))
  builder = LocalFashionMnist(idx_files=files, data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return os.fspath(builder.data_path)


def network_available(host: str = 'storage.googleapis.com', port: int = 443,
                      timeout: float = 3.0) -> bool:
  """Whether TFDS's download host answers (so we never wait minutes on retries offline)."""
  try:
    with socket.create_connection((host, port), timeout=timeout):
      return True
  except OSError:
    return False


def _remedies(name: str, data_dir: str) -> str:
  local = (f'(1) install the IDX files: `{APT_COMMAND}` (or `make data`), or point '
           f'config.data.idx_dir at a directory holding train-images-idx3-ubyte.gz etc.; '
           if name == 'fashion_mnist' else
           f'(1) prepare it where there is a network: `tfds build {name} --data_dir=DIR` and copy '
           f'DIR here, or set config.data.data_dir to an existing prepared copy; ')
  return (local + f'(2) run on a machine with network access so TFDS can download {name!r} into '
          f'{data_dir} (config.data.download=True).')


def is_prepared(name: str, data_dir: str) -> bool:
  """Whether `tfds.load(name, data_dir=data_dir, download=False)` can read it.

  Besides a prepared copy on disk this is true under `tfds.testing.mock_data`, which
  serves random examples without files.
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'TFDS has no dataset named {name!r}: {e}') from None
  if builder.is_prepared():
    return True
  try:
    builder.as_dataset(split=list(builder.info.splits)[0] if builder.info.splits else 'train')
    return True
  except (AssertionError, FileNotFoundError, ValueError, KeyError):
    return False


def ensure_prepared(name: str, data_dir: str | None = None, *, idx_dir: str | None = None,
                    download: bool = True) -> str:
  """Makes `tfds.load(name, data_dir=...)` work offline when possible; returns the data_dir.

  Args:
    name: TFDS name, optionally with a version ('fashion_mnist:3.0.1').
    data_dir: TFDS data dir (None: TFDS's default).
    idx_dir: where fashion_mnist's IDX files are (None: the Debian path).
    download: allow TFDS to download when the network is reachable.
  """
  data_dir = data_dir or default_data_dir()
  if is_prepared(name, data_dir):
    return data_dir
  base = name.split(':')[0]
  if base == 'fashion_mnist':
    idx_dir = idx_dir or DEFAULT_IDX_DIR
    if find_idx_files(idx_dir) is not None:
      prepare_fashion_mnist(data_dir, idx_dir)
      return data_dir
  if download and network_available():
    tfds.builder(name, data_dir=data_dir).download_and_prepare()
    return data_dir
  where = f' and no IDX files in {idx_dir}' if base == 'fashion_mnist' else ''
  raise MissingDataError(f'TFDS dataset {name!r} is not prepared in {data_dir}{where}, and '
                         f'{"downloading is off" if not download else "the network is unreachable"}. '
                         + _remedies(base, data_dir))


def main(argv=None):
  import argparse
  p = argparse.ArgumentParser(description='Make a TFDS dataset readable offline (see module doc).')
  p.add_argument('--name', default='fashion_mnist')
  p.add_argument('--data_dir', default=None, help='TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)')
  p.add_argument('--idx_dir', default=None, help=f'IDX files of fashion_mnist (default {DEFAULT_IDX_DIR})')
  p.add_argument('--no_download', action='store_true')
  args = p.parse_args(argv)
  try:
    data_dir = ensure_prepared(args.name, args.data_dir, idx_dir=args.idx_dir, download=not args.no_download)
  except MissingDataError as e:
    raise SystemExit(f'error: {e}') from None
  print(f'{args.name} is ready in {data_dir}')


if __name__ == '__main__':
  main()

"""TFDS image pipeline: IDX reading, offline preparation, (seed, step) batch order, eval padding."""
import gzip
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from moe_jax.data import prepare
from moe_jax.data.images import ImageData, augment_numpy
from moe_jax.configs import vit

IDX_DIR = prepare.DEFAULT_IDX_DIR
HAVE_IDX = prepare.find_idx_files(IDX_DIR) is not None


def _write_idx(path, array, type_byte):
  """IDX writer from the format description: 0, 0, type, ndim, big-endian uint32 dims, data."""
  header = bytes([0, 0, type_byte, array.ndim]) + b''.join(
      int(n).to_bytes(4, 'big') for n in array.shape)
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(header + array.astype(array.dtype.newbyteorder('>')).tobytes())


@pytest.mark.parametrize('name, type_byte, dtype', [('a.gz', 0x08, np.uint8), ('b', 0x0C, np.int32)])
def test_read_idx_round_trips(tmp_path, name, type_byte, dtype):
  x = np.random.default_rng(0).integers(0, 200, size=(3, 4, 5)).astype(dtype)
  path = str(tmp_path / name)
  _write_idx(path, x, type_byte)
  got = prepare.read_idx(path)
  np.testing.assert_array_equal(got, x)
  assert got.dtype == dtype


def test_read_idx_rejects_other_files(tmp_path):
  path = tmp_path / 'x'
  path.write_bytes(b'\x89PNG....')
  with pytest.raises(ValueError, match='not an IDX file'):
    prepare.read_idx(str(path))


def test_missing_data_names_both_remedies(tmp_path):
  with pytest.raises(prepare.MissingDataError) as e:
    prepare.ensure_prepared('fashion_mnist', str(tmp_path / 'tfds'), idx_dir=str(tmp_path / 'none'),
                            download=False)
  msg = str(e.value)
  assert 'apt-get install -y dataset-fashion-mnist' in msg and 'idx_dir' in msg
  assert 'network' in msg and str(tmp_path / 'tfds') in msg


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_IDX, reason='dataset-fashion-mnist is not installed')
def test_local_idx_files_become_the_registered_tfds_dataset(tmp_path):
  """The test split (first 2000 images) prepared from Debian's IDX files reads back through tfds.load."""
  files = {'test': prepare.find_idx_files(IDX_DIR)['test']}
  builder = prepare.LocalFashionMnist(idx_files=files, limit=2000, data_dir=str(tmp_path))
  builder.download_and_prepare()
  registered = tfds.builder('fashion_mnist', data_dir=str(tmp_path))
  assert type(registered).__name__ == 'FashionMNIST' and registered.is_prepared()
  assert registered.info.version == builder.info.version
  ds = tfds.load('fashion_mnist', split='test', data_dir=str(tmp_path), download=False)
  images, labels = [], []
  for b in tfds.as_numpy(ds.batch(1000)):
    images.append(b['image'])
    labels.append(b['label'])
  images, labels = np.concatenate(images), np.concatenate(labels)
  x, y = prepare.read_idx(files['test'][0])[:2000], prepare.read_idx(files['test'][1])[:2000]
  assert images.shape == (2000, 28, 28, 1) and registered.info.splits['test'].num_examples == 2000
  # Same (image, label) pairs; TFDS shuffles the order when writing.
  key = lambda im, lab: sorted(zip(im.reshape(len(im), -1).sum(1).tolist(), lab.tolist()))
  assert key(images, labels) == key(x, y)


def _indexed_dataset(n):
  """A fake split whose top-left and top-right pixels encode the example index (flip-proof)."""
  def as_dataset_fn(self, split, **kwargs):
    idx = np.arange(n)
    images = np.zeros((n, 28, 28, 1), np.uint8)
    images[:, 0, 0, 0] = images[:, 0, 27, 0] = idx % 256
    images[:, 0, 1, 0] = images[:, 0, 26, 0] = idx // 256
    return tf.data.Dataset.from_tensor_slices({'image': images, 'label': idx % 10 + 0 * idx})
  return as_dataset_fn


def _data(batch_size=8, seed=0, n=50, **overrides):
  c = vit.base_config().data
  c.update(overrides)
  with tfds.testing.mock_data(num_examples=n, as_dataset_fn=_indexed_dataset(n)):
    return ImageData.from_config(c, batch_size=batch_size, eval_batch_size=16, seed=seed,
                                 image_size=28)


def _ids(batch):
  px = np.round((batch['image'][:, 0, :2, 0] + 1) * 255 / 2).astype(int)
  return px[:, 0] + 256 * px[:, 1]


def test_batches_are_a_function_of_seed_and_step():
  a, b = _data(), _data()
  assert a.steps_per_epoch == 6
  for step in (0, 5, 6, 13):
    np.testing.assert_array_equal(_ids(a.train_batch(step)), _ids(b.train_batch(step)))
  assert not np.array_equal(_ids(a.train_batch(0)), _ids(a.train_batch(6)))   # reshuffled per epoch
  assert not np.array_equal(_ids(a.train_batch(0)), _ids(_data(seed=1).train_batch(0)))
  seen = np.concatenate([_ids(a.train_batch(s)) for s in range(6, 12)])         # epoch 1
  assert len(set(seen.tolist())) == 48                                          # no repeats
  resumed = a.train_iterator(13)
  for step in range(13, 16):
    s, batch = next(resumed)
    assert s == step
    np.testing.assert_array_equal(_ids(batch), _ids(a.train_batch(step)))
  assert a.position(13) == {'seed': 0, 'next_step': 13, 'steps_per_epoch': 6}


def test_eval_covers_the_split_once_with_padding_masked():
  d = _data(n=50)
  batches = list(d.eval_batches())
  assert [len(b['label']) for b in batches] == [16] * 4
  mask = np.concatenate([b['mask'] for b in batches])
  ids = np.concatenate([_ids(b) for b in batches])[mask > 0]
  assert mask.sum() == 50 and sorted(ids.tolist()) == list(range(50))


def test_augmentations_keep_content():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 255, size=(64, 28, 28, 1)).astype(np.uint8)
  flipped = augment_numpy(x, 'flip', np.random.default_rng(1))
  for a, b in zip(x, flipped):
    assert np.array_equal(a, b) or np.array_equal(a[:, ::-1], b)
  assert any(not np.array_equal(a, b) for a, b in zip(x, flipped))
  crops = augment_numpy(x, 'crop_flip', np.random.default_rng(2))
  assert crops.shape == x.shape
  # A crop of the zero-padded image: every row is a shifted (maybe flipped) slice of the original.
  padded = np.pad(x[0, :, :, 0], 4)
  c = crops[0, :, :, 0]
  assert any(np.array_equal(padded[i:i + 28, j:j + 28], c) or np.array_equal(padded[i:i + 28, j:j + 28][:, ::-1], c)
             for i in range(9) for j in range(9))


def test_stream_mode_resumes_at_the_same_batch():
  with tfds.testing.mock_data(num_examples=50, as_dataset_fn=_indexed_dataset(50)):
    d = _data(mode='stream', augment='flip', shuffle_buffer=64)
    first = [b for _, b in zip(range(9), (b for _, b in d.train_iterator(0)))]
    resumed = d.train_iterator(7)
    for want_step, want in zip((7, 8), first[7:9]):
      step, batch = next(resumed)
      assert step == want_step
      np.testing.assert_array_equal(batch['image'], want['image'])   # same flips too
  epoch0 = np.concatenate([_ids(b) for b in first[:6]])
  assert len(set(epoch0.tolist())) == 48


def test_bad_data_options_raise():
  with pytest.raises(ValueError, match='mode'):
    _data(mode='disk')
  with pytest.raises(ValueError, match='inception_crop'):
    _data(augment='inception_crop')
  with pytest.raises(ValueError, match='fewer than batch_size'):
    _data(batch_size=64)

"""TFDS image-classification input pipeline whose batch order is a function of (seed, step).

    data = ImageData.from_config(config.data, batch_size=128, eval_batch_size=500, seed=0,
                                 image_size=28)
    for step, batch in data.train_iterator(start_step):   # batch['image'] [B, H, W, C] float32
      ...                                                 #       ['label'] [B] int32
    for batch in data.eval_batches():                     # + batch['mask'] [B] (padding = 0)
      ...

Epoch e visits the training examples in the order of a permutation drawn from
(seed, e); step t is batch t mod steps_per_epoch of epoch t div steps_per_epoch. A run
resumed at step t therefore sees exactly the batches an uninterrupted run would.

Two modes (`config.data.mode`):
* 'memory' (small datasets such as Fashion-MNIST): the split is read once through
  `tfds.load` into uint8 arrays; a batch is a gather plus optional numpy augmentation
  seeded by (seed, step). Resuming costs nothing.
* 'stream' (ImageNet-size datasets): tf.data per epoch, files and examples shuffled
  with seeds derived from (seed, epoch); resuming skips the undecoded records of the
  current epoch only.

Pixels are scaled to [-1, 1]. Augmentations: 'none', 'flip' (horizontal), 'crop_flip'
(pad by 1/7 of the size with zeros, random crop back, flip); stream mode adds
'inception_crop' (random-resized crop + flip, the ViT / big_vision ImageNet default).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from moe_jax.data.prepare import default_data_dir, ensure_prepared

AUGMENTS = ('none', 'flip', 'crop_flip', 'inception_crop')
MODES = ('memory', 'stream')


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.default_rng([seed, epoch]).integers(2**31 - 1))


PIXEL_RANGE = (-1.0, 1.0)     # uint8 pixels 0..255 are scaled linearly onto this range


def _to_float(images: np.ndarray) -> np.ndarray:
  return images.astype(np.float32) * (2.0 / 255.0) - 1.0


def augment_numpy(images: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
  """images: [B, H, W, C] uint8 -> same shape, augmented with `rng`."""
  if kind == 'none':
    return images
  b, h, w, _ = images.shape
  if kind == 'crop_flip':
    ph, pw = max(1, h // 7), max(1, w // 7)
    padded = np.pad(images, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    dy, dx = rng.integers(0, 2 * ph + 1, b), rng.integers(0, 2 * pw + 1, b)
    rows = dy[:, None] + np.arange(h)[None]                       # [B, H]
    cols = dx[:, None] + np.arange(w)[None]                       # [B, W]
    images = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
  flip = rng.random(b) < 0.5
  return np.where(flip[:, None, None, None], images[:, :, ::-1], images)


@dataclasses.dataclass
class ImageData:
  """A training split (repeated, shuffled per epoch) and an evaluation split.

  Attributes:
    name: TFDS name; num_classes; image_shape (H, W, C) as fed to the model.
    batch_size: global batch; each process yields its `batch_size // process_count` rows.
    train_size: examples in the training split; steps_per_epoch = train_size // batch_size.
  """
  name: str
  data_dir: str
  train_split: str
  eval_split: str
  batch_size: int
  eval_batch_size: int
  seed: int
  mode: str
  augment: str
  image_size: int | None
  shuffle_buffer: int
  num_classes: int = 0
  image_shape: tuple = ()
  train_size: int = 0
  _train: dict | None = None
  _eval: dict | None = None

  @classmethod
  def from_config(cls, cfg, *, batch_size: int, eval_batch_size: int, seed: int,
                  image_size: int | None = None) -> ImageData:
    """`cfg` is `config.data`; prepares the dataset when it can (see `prepare.py`).

    `image_size`: the model's input size; images of another size are resized to it.
    """
    if cfg.mode not in MODES:
      raise ValueError(f'config.data.mode must be one of {MODES}, got {cfg.mode!r}.')
    if cfg.augment not in AUGMENTS or (cfg.augment == 'inception_crop' and cfg.mode != 'stream'):
      raise ValueError(f'config.data.augment must be one of {AUGMENTS} (inception_crop needs '
                       f"mode='stream'), got {cfg.augment!r} with mode {cfg.mode!r}.")
    for name, size in (('batch_size', batch_size), ('eval_batch_size', eval_batch_size)):
      if size % jax.process_count():
        raise ValueError(f'{name} {size} must be divisible by {jax.process_count()} processes.')
    data_dir = ensure_prepared(cfg.name, cfg.get('data_dir') or default_data_dir(),
                               idx_dir=cfg.get('idx_dir'), download=cfg.get('download', True))
    self = cls(name=cfg.name, data_dir=data_dir, train_split=cfg.train_split,
               eval_split=cfg.eval_split, batch_size=batch_size, eval_batch_size=eval_batch_size,
               seed=seed, mode=cfg.mode, augment=cfg.augment, image_size=image_size,
               shuffle_buffer=cfg.get('shuffle_buffer', 10_000))
    self._load_info()
    return self

  # ---------------------------------------------------------------- metadata
  def _load_info(self):
    builder = tfds.builder(self.name, data_dir=self.data_dir)
    info = builder.info
    if 'label' not in info.features or 'image' not in info.features:
      raise ValueError(f'{self.name!r} is not an image classification dataset '
                       "(needs 'image' and 'label' features).")
    self.num_classes = info.features['label'].num_classes
    h, w, c = info.features['image'].shape
    if self.image_size:
      h = w = self.image_size
    if h is None or w is None:
      raise ValueError(f'{self.name!r} has variable image sizes: set config.data.image_size.')
    self.image_shape = (h, w, c)
    if self.mode == 'memory':
      self._train = self._read_split(self.train_split)
      self._eval = self._read_split(self.eval_split)
      self.train_size = len(self._train['label'])
    else:
      ds = tfds.load(self.name, split=self.train_split, data_dir=self.data_dir, download=False)
      self.train_size = int(ds.cardinality())   # TFDS knows it from the split metadata
    if self.train_size < self.batch_size:
      raise ValueError(f'train split {self.train_split!r} has {self.train_size} examples, fewer '
                       f'than batch_size {self.batch_size}.')

  def _read_split(self, split: str) -> dict:
    ds = tfds.load(self.name, split=split, data_dir=self.data_dir, download=False)
    chunks = list(tfds.as_numpy(ds.batch(10_000)))
    images = np.concatenate([c['image'] for c in chunks])
    arrays = {'label': np.concatenate([c['label'] for c in chunks])}
    if self.image_size and images.shape[1:3] != (self.image_size, self.image_size):
      images = tf.image.resize(images, (self.image_size,) * 2).numpy().round().clip(0, 255)
    return {'image': images.astype(np.uint8), 'label': arrays['label'].astype(np.int32)}

  @property
  def steps_per_epoch(self) -> int:
    return self.train_size // self.batch_size

  @property
  def local_batch_size(self) -> int:
    return self.batch_size // jax.process_count()

  def position(self, step: int) -> dict:
    """The data position to checkpoint: the next batch is a function of these alone."""
    return {'seed': self.seed, 'next_step': int(step), 'steps_per_epoch': self.steps_per_epoch}

  # ---------------------------------------------------------------- training
  def train_batch(self, step: int) -> dict:
    """Memory mode: this process's rows of global batch `step`, a pure function of (seed, step)."""
    epoch, i = divmod(step, self.steps_per_epoch)
    perm = np.random.default_rng([self.seed, epoch]).permutation(self.train_size)
    idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
    lo = jax.process_index() * self.local_batch_size
    idx = idx[lo:lo + self.local_batch_size]
    rng = np.random.default_rng([self.seed, step, 1])
    images = augment_numpy(self._train['image'][idx], self.augment, rng)
    return {'image': _to_float(images), 'label': self._train['label'][idx]}

  def train_iterator(self, start_step: int = 0) -> Iterator[tuple[int, dict]]:
    """Yields (step, batch) from `start_step` on, forever."""
    if self.mode == 'memory':
      step = start_step
      while True:
        yield step, self.train_batch(step)
        step += 1
    else:
      yield from self._stream_train(start_step)

  def _stream_epoch(self, epoch: int) -> tf.data.Dataset:
    split = self.train_split
    if jax.process_count() > 1:
      split = tfds.split_for_jax_process(split)
    seed = _epoch_seed(self.seed, epoch)
    ds = tfds.load(self.name, split=split, data_dir=self.data_dir, download=False,
                   shuffle_files=True, read_config=tfds.ReadConfig(shuffle_seed=seed),
                   decoders={'image': tfds.decode.SkipDecoding()})
    return ds.shuffle(self.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)

  def _stream_preprocess(self, ex, seed):
    h, w, c = self.image_shape
    image = ex['image']
    if image.dtype == tf.string:   # encoded (SkipDecoding): decode after the resume skip
      image = tf.io.decode_image(image, channels=c, expand_animations=False)
    if self.augment == 'inception_crop':
      begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
          tf.shape(image), tf.zeros([0, 0, 4]), seed=seed, area_range=(0.05, 1.0),
          min_object_covered=0, use_image_if_no_bounding_boxes=True)
      image = tf.slice(image, begin, size)
    image = tf.image.resize(image, (h, w))
    if self.augment in ('flip', 'crop_flip', 'inception_crop'):
      image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
    image = tf.cast(image, tf.float32) * (2.0 / 255.0) - 1.0
    return {'image': image, 'label': tf.cast(ex['label'], tf.int32)}

  def _stream_train(self, start_step: int) -> Iterator[tuple[int, dict]]:
    epoch, skip = divmod(start_step, self.steps_per_epoch)
    step = start_step
    while True:
      # Enumerate before skipping: example i's augmentation seed is the same after a resume.
      ds = self._stream_epoch(epoch).enumerate().skip(skip * self.local_batch_size)
      ds = ds.map(
          lambda i, ex: self._stream_preprocess(ex, tf.stack([_epoch_seed(self.seed, epoch), tf.cast(i, tf.int32)])),
          num_parallel_calls=tf.data.AUTOTUNE)
      ds = ds.batch(self.local_batch_size, drop_remainder=True).take(self.steps_per_epoch - skip)
      for batch in tfds.as_numpy(ds.prefetch(2)):
        yield step, batch
        step += 1
      epoch, skip = epoch + 1, 0

  # ---------------------------------------------------------------- evaluation
  def eval_batches(self) -> Iterator[dict]:
    """The whole eval split in fixed-size batches; the last one padded, `mask` = 0 on padding.

    On several processes each yields its rows of every global batch (as in training).
    """
    target = self.eval_batch_size
    if self.mode == 'memory':
      images, labels = self._eval['image'], self._eval['label']
      chunks = ((images[lo:lo + self.eval_batch_size], labels[lo:lo + self.eval_batch_size])
                for lo in range(0, len(labels), self.eval_batch_size))
    else:
      chunks = self._stream_eval_chunks()
      target //= jax.process_count()   # each process evaluates its share
    for x, y in chunks:
      pad = target - len(y)
      mask = np.concatenate([np.ones(len(y), np.float32), np.zeros(pad, np.float32)])
      if pad:
        x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
        y = np.concatenate([y, np.zeros(pad, y.dtype)])
      if self.mode == 'memory' and jax.process_count() > 1:   # this process's rows
        rows = slice(jax.process_index() * target // jax.process_count(),
                     (jax.process_index() + 1) * target // jax.process_count())
        x, y, mask = x[rows], y[rows], mask[rows]
      yield {'image': _to_float(x), 'label': y, 'mask': mask}

  def _stream_eval_chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream mode: the eval split resized to the model's size, as uint8 chunks."""
    h, w, _ = self.image_shape
    split = self.eval_split
    if jax.process_count() > 1:
      split = tfds.split_for_jax_process(split)
    ds = tfds.load(self.name, split=split, data_dir=self.data_dir, download=False)

    def prep(ex):
      image = tf.image.resize(ex['image'], (h, w))
      return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), tf.cast(ex['label'], tf.int32)
    yield from tfds.as_numpy(ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE)
                             .batch(self.eval_batch_size // jax.process_count()).prefetch(2))

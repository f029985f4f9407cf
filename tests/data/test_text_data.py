"""TextData on the tiny corpus: batch contents against the documents, (seed, step) order,
resume, processes, eval padding, the recorded tokenizer, and tfds mock data."""
import collections

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from moe_jax.data import text_corpus, text_objectives
from moe_jax.data.text import TextData
from moe_jax.errors import ConfigError

from tiny_text_corpus import VOCAB

CAUSAL_KEYS = {'tokens', 'targets', 'segment_ids', 'positions', 'weights'}
SPAN_KEYS = {'inputs', 'input_segment_ids', 'input_positions', 'decoder_inputs', 'targets',
             'target_segment_ids', 'target_positions', 'weights'}


def make(tiny_corpus, objective, batch_size=4, seed=0, eval_batch_size=8, **cfg):
  length = {'seq_len': 32} if objective == 'causal_lm' else {'inputs_length': 32}
  cfg = ml_collections.ConfigDict({'data_dir': tiny_corpus[1], 'vocab_size': VOCAB, **length, **cfg})
  return TextData.from_config(cfg,
                              objective=objective, batch_size=batch_size,
                              eval_batch_size=eval_batch_size, seed=seed)


def documents(data, split='train'):
  """Each document of the split tokenised here, independently of TextData's cache."""
  ds = tfds.load('debian_docs', split=split, data_dir=data.data_dir)
  return [data.tokenizer.encode(ex['text'].decode()) for ex in tfds.as_numpy(ds)]


def segments(values, segment_ids):
  """[(row, segment id) -> tokens] of a batch."""
  out = {}
  for r in range(values.shape[0]):
    for s in np.unique(segment_ids[r][segment_ids[r] > 0]):
      out[(r, int(s))] = values[r][segment_ids[r] == s]
  return out


def epoch_rows(data):
  """Every training row once: batch size 1 visits all rows in epoch 0."""
  assert data.batch_size == 1
  return [data.train_batch(s) for s in range(data.steps_per_epoch)]


def test_causal_lm_batch_layout(tiny_corpus):
  data = make(tiny_corpus, 'causal_lm')
  b = data.train_batch(3)
  assert set(b) == CAUSAL_KEYS and all(v.shape == (4, 32) for v in b.values())
  assert b['weights'].dtype == np.float32 and b['tokens'].dtype == np.int32
  seg, pos = b['segment_ids'], b['positions']
  np.testing.assert_array_equal(b['weights'], seg > 0)
  # Inputs are the targets one step late, restarting with 0 in every document.
  np.testing.assert_array_equal(b['tokens'][:, 1:][pos[:, 1:] > 0], b['targets'][:, :-1][pos[:, 1:] > 0])
  assert (b['tokens'][pos == 0] == 0).all()
  for (r, s), _ in segments(b['targets'], seg).items():
    np.testing.assert_array_equal(pos[r][seg[r] == s], np.arange((seg[r] == s).sum()))


def test_causal_lm_rows_hold_every_document_piece_once(tiny_corpus):
  data = make(tiny_corpus, 'causal_lm', batch_size=1)
  want = []
  for doc in documents(data):
    doc = doc + [1]                                          # EOS ends every document
    want += [tuple(doc[o:o + 32]) for o in range(0, len(doc), 32) if len(doc[o:o + 32]) >= 2]
  rows = epoch_rows(data)
  got = [tuple(v) for b in rows for v in segments(b['targets'], b['segment_ids']).values()]
  assert collections.Counter(got) == collections.Counter(want)
  assert max(b['segment_ids'].max() for b in rows) >= 3          # rows really pack documents
  unpacked = make(tiny_corpus, 'causal_lm', batch_size=1, pack=False)
  rows = epoch_rows(unpacked)
  assert max(b['segment_ids'].max() for b in rows) == 1
  got = [tuple(v) for b in rows for v in segments(b['targets'], b['segment_ids']).values()]
  assert collections.Counter(got) == collections.Counter(want)
  assert data.tokenizer_info['tokens']['train'] == sum(len(d) for d in documents(data))


def test_span_corruption_rows_reconstruct_every_raw_segment(tiny_corpus):
  data = make(tiny_corpus, 'span_corruption', batch_size=1)
  raw, targets_length = text_objectives.raw_length_for(32)
  assert data.lengths == {'inputs': 32, 'targets': targets_length, 'raw': raw}
  want = [tuple(d[o:o + raw]) for d in documents(data) for o in range(0, len(d), raw)
          if len(d[o:o + raw]) >= 2]
  got = []
  for b in epoch_rows(data):
    assert set(b) == SPAN_KEYS
    assert b['inputs'].shape == (1, 32) and b['targets'].shape == (1, targets_length)
    ins = segments(b['inputs'], b['input_segment_ids'])
    tgs = segments(b['targets'], b['target_segment_ids'])
    assert ins.keys() == tgs.keys()
    np.testing.assert_array_equal(b['weights'], b['target_segment_ids'] > 0)
    pos = b['target_positions']
    later = pos[:, 1:] > 0
    np.testing.assert_array_equal(b['decoder_inputs'][:, 1:][later], b['targets'][:, :-1][later])
    for key in ins:
      a, t = ins[key], tgs[key]
      assert a[-1] == t[-1] == 1 and t[0] == VOCAB - 1      # EOS on both; <extra_id_0> first
      tokens = _reconstruct(a, t)
      assert (len(a), len(t)) == text_objectives.corrupted_lengths(len(tokens))
      got.append(tuple(tokens))
  assert collections.Counter(got) == collections.Counter(want)


def test_span_corruption_with_shorter_targets(tiny_corpus):
  data = make(tiny_corpus, 'span_corruption', targets_length=6)
  assert data.lengths['targets'] == 6 and data.lengths['raw'] < text_objectives.raw_length_for(32)[0]
  assert text_objectives.corrupted_lengths(data.lengths['raw'])[1] <= 6
  b = data.train_batch(0)
  assert b['targets'].shape == (4, 6) and b['inputs'].shape == (4, 32)


def _reconstruct(inputs, targets, num_sentinels=100):
  spans, cur = {}, None
  for t in targets[:-1]:
    if t >= VOCAB - num_sentinels:
      cur = spans.setdefault(int(t), [])
    else:
      cur.append(int(t))
  return [x for t in inputs[:-1] for x in (spans[int(t)] if t >= VOCAB - num_sentinels else [int(t)])]


@pytest.mark.parametrize('objective', ['causal_lm', 'span_corruption'])
def test_batches_are_a_function_of_seed_and_step(tiny_corpus, objective):
  a, b = make(tiny_corpus, objective), make(tiny_corpus, objective)
  steps = [0, 1, a.steps_per_epoch - 1, a.steps_per_epoch, 2 * a.steps_per_epoch + 5]
  for s in steps:
    _assert_same(a.train_batch(s), b.train_batch(s))
  resumed = b.train_iterator(start_step=steps[-1])
  fresh = a.train_iterator(0)
  for _ in range(steps[-1]):
    next(fresh)
  for _ in range(3):
    (s1, x), (s2, y) = next(fresh), next(resumed)
    assert s1 == s2
    _assert_same(x, y)
  other = make(tiny_corpus, objective, seed=1)
  assert any((a.train_batch(s)['targets'] != other.train_batch(s)['targets']).any() for s in steps)
  assert a.position(7) == {'seed': 0, 'next_step': 7, 'steps_per_epoch': a.steps_per_epoch,
                           'rows': a.train_size,
                           'dataset_checksum': a.tokenizer_info['dataset_checksum'],
                           'tokenizer_sha256': a.tokenizer.sha256}


def test_span_noise_differs_between_epochs(tiny_corpus):
  """The same row is corrupted afresh every time it comes back (as T5)."""
  data = make(tiny_corpus, 'span_corruption', batch_size=1)
  n = data.steps_per_epoch
  first = {tuple(data.train_batch(s)['targets'][0]) for s in range(n)}
  second = {tuple(data.train_batch(n + s)['targets'][0]) for s in range(n)}
  assert first != second


def _assert_same(x, y):
  assert x.keys() == y.keys()
  for k in x:
    np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize('objective', ['causal_lm', 'span_corruption'])
def test_each_process_yields_its_rows(tiny_corpus, objective, monkeypatch):
  data = make(tiny_corpus, objective)
  whole, whole_eval = data.train_batch(5), list(data.eval_batches())
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  parts, evals = [], []
  for i in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda i=i: i)
    data._eval = None
    parts.append(data.train_batch(5))
    evals.append(list(data.eval_batches()))
  for k in whole:
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k], err_msg=k)
    for j, e in enumerate(whole_eval):
      np.testing.assert_array_equal(np.concatenate([ev[j][k] for ev in evals]), e[k], err_msg=k)


@pytest.mark.parametrize('objective', ['causal_lm', 'span_corruption'])
def test_eval_batches_are_fixed_and_padded(tiny_corpus, objective):
  a, b = make(tiny_corpus, objective, seed=0), make(tiny_corpus, objective, seed=3)
  ea, eb = list(a.eval_batches()), list(b.eval_batches())
  assert len(ea) == len(eb) >= 1
  for x, y in zip(ea, eb):
    _assert_same(x, y)                                      # independent of the training seed
  key = 'segment_ids' if objective == 'causal_lm' else 'target_segment_ids'
  real = lambda batches: [{k: v[(e[key] > 0).any(1)] for k, v in e.items()} for e in batches]
  rows = {k: np.concatenate([e[k] for e in real(ea)]) for k in ea[0]}
  # One batch 2 rows longer than the eval set: the same rows, then 2 empty ones.
  (padded,) = make(tiny_corpus, objective, eval_batch_size=len(rows[key]) + 2).eval_batches()
  for k, v in padded.items():
    np.testing.assert_array_equal(v[:-2], rows[k], err_msg=k)
    assert (v[-2:] == 0).all(), k
  capped = make(tiny_corpus, objective, eval_max_rows=3)
  rows = sum(int(((e['weights'] > 0).any(1)).sum()) for e in capped.eval_batches())
  assert rows == 3


def test_tokenizer_info_and_vocab(tiny_corpus):
  data = make(tiny_corpus, 'causal_lm')
  info = data.tokenizer_info
  manifest = text_corpus.stored_manifest(tiny_corpus[1])
  assert info['dataset'] == 'debian_docs:1.0.0' and info['dataset_checksum'] == manifest['checksum']
  assert info['vocab_size'] == data.vocab_size == VOCAB and info['trained_on'] == 'train'
  import hashlib
  assert info['sha256'] == hashlib.sha256(open(info['path'], 'rb').read()).hexdigest()
  assert data.tokenizer.decode(data.tokenizer.encode('the module')) == 'the module'


def test_unknown_config_field_is_a_config_error(tiny_corpus):
  with pytest.raises(ConfigError, match='config.data.seq_length'):
    make(tiny_corpus, 'causal_lm', seq_length=64)


@pytest.mark.parametrize('name, eval_split', [('debian_docs', 'validation'), ('lm1b', 'test')])
def test_mock_data_needs_no_installed_text(tmp_path, name, eval_split):
  """Under tfds.testing.mock_data (random letters), any TFDS text name yields batches."""
  with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
    data = TextData.from_config({'name': name, 'data_dir': str(tmp_path), 'eval_split': eval_split,
                                 'vocab_size': 384, 'seq_len': 16},
                                objective='causal_lm', batch_size=4, eval_batch_size=4, seed=0)
    b = data.train_batch(0)
    assert b['tokens'].shape == (4, 16) and b['weights'].sum() > 0
    assert len(list(data.eval_batches())) >= 1

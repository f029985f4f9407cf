"""Hash tables built from data by the experiments' prepare hook: the balanced table from
token counts (greedy, checked in numpy), clustered / dispersed from embeddings, the files
and manifests, and token counts of a tokenised training split."""
import json
import os

import numpy as np
import pytest

from moe_jax.experiments import hash_tables, run
from moe_jax.routing import hashing


def test_balanced_table_spreads_token_mass_evenly():
  counts = np.random.default_rng(0).zipf(1.3, 500).clip(max=10_000)
  table = hash_tables.build('balanced', 8, counts=counts)
  mass = np.bincount(table, weights=counts, minlength=8)
  # Greedy "largest first into the lightest bucket": every bucket is within the largest
  # single count of the mean (or holds one token only when that token alone exceeds it).
  assert mass.max() - mass.min() <= counts.max()
  assert set(np.unique(table)) == set(range(8))


def test_clustered_puts_similar_tokens_together_and_dispersed_apart():
  rng = np.random.default_rng(1)
  centers = rng.normal(size=(4, 6)) * 20
  emb = np.concatenate([c + rng.normal(size=(8, 6)) for c in centers])       # 4 tight clusters
  clustered = hash_tables.build('clustered', 4, embeddings=emb)
  dispersed = hash_tables.build('dispersed', 4, embeddings=emb)
  for k in range(4):
    block = slice(8 * k, 8 * k + 8)
    assert len(set(clustered[block])) == 1                 # one cluster, one expert
    assert sorted(np.bincount(dispersed[block], minlength=4)) == [2, 2, 2, 2]   # spread
  with pytest.raises(ValueError, match='not built from data'):
    hash_tables.build('random', 4)


def test_prepare_builds_missing_tables_from_counts_and_the_dense_run(tmp_path, monkeypatch):
  vocab, d = 40, 5
  counts = np.arange(vocab)[::-1] + 1
  emb = np.random.default_rng(2).normal(size=(vocab, d)).astype(np.float32)
  trained = []
  monkeypatch.setattr(hash_tables, 'token_counts', lambda config: (counts, {'sha256': 'abc'}))
  monkeypatch.setattr(hash_tables, 'input_embeddings', lambda wd: emb)
  exp = run.load_experiment('experiments/lm_hash.py')
  root = str(tmp_path)
  runs = run.expand(exp, root)

  def train(r):
    trained.append(r.name)
    return 'done'

  paths = hash_tables.prepare(exp=exp, root=root, runs=runs, train=train, num_experts=4)
  assert trained == ['dense/seed_0']
  for kind in ('balanced', 'clustered', 'dispersed'):
    table = hashing.load_table(paths[kind])
    assert paths[kind] == os.path.join(root, 'hash_tables', f'{kind}_E4.npy')
    np.testing.assert_array_equal(table, hash_tables.build(kind, 4, counts=counts, embeddings=emb))
    manifest = json.load(open(paths[kind][:-4] + '.json'))
    assert manifest['vocab_size'] == vocab and manifest['tokenizer_sha256'] == 'abc'
    assert sum(manifest['expert_sizes']) == vocab
    assert sum(manifest['expert_token_mass']) == pytest.approx(1.0, abs=1e-3)
  # The arms' table paths are these files.
  arm = next(a for a in exp.arms if a['name'] == 'hash_balanced')
  assert arm['overrides']['model.moe.router_kwargs.table_path'] == '{root}/hash_tables/balanced_E16.npy'
  trained.clear()
  hash_tables.prepare(exp=exp, root=root, runs=runs, train=train, num_experts=4)
  assert trained == []                                                         # kept


def test_train_token_counts_of_the_tokenised_split(tmp_path):
  from moe_jax.data.text import TextData
  from tests.train.lm_helpers import VOCAB, mock_text, tiny_lm_config
  config = tiny_lm_config('causal_lm', 'hash', str(tmp_path / 'tfds'))
  with mock_text():
    counts, info = hash_tables.token_counts(config)
    data = TextData.from_config(config.data, objective='causal_lm', batch_size=4,
                                eval_batch_size=4, seed=0)
  stream = data._train[0]
  assert counts.shape == (VOCAB,) and counts.sum() == len(stream)
  np.testing.assert_array_equal(counts, np.bincount(stream, minlength=VOCAB))
  assert info['vocab_size'] == VOCAB

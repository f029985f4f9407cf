"""Hash-layer lookup tables built from data: the `prepare` hook of the hash experiments.

    prepare=[dict(fn='moe_jax.experiments.hash_tables:prepare',
                  kwargs=dict(num_experts=16, embedding_arm='dense'))]

Roller et al. (2021) build three of their hash kinds from data: 'balanced' from token
frequencies of the training set, 'clustered' and 'dispersed' from token embeddings
(k-means). Here:

* frequencies: every id's count in the tokenised training split of the experiment's data
  (`TextData.train_token_counts`; the run config of the embedding arm, seed 0, names the
  data and the tokenizer);
* embeddings: the input embedding matrix [V, d] of the embedding arm's seed-0 run (a
  dense LM trained by the experiment itself, before the hash arms), read from its final
  checkpoint;
* the builders of `moe_jax.routing.hashing` (greedy balanced assignment; k-means with
  k-means++ seeding, seed `seed`), so the tables are a function of the data, the dense
  run and the seed: rerunning the experiment rebuilds the same files.

Files: <root>/hash_tables/<kind>_E<E>.npy (`hashing.save_table`, what the arms pass as
`router_kwargs.table_path='{root}/hash_tables/<kind>_E<E>.npy'`) and a manifest
<kind>_E<E>.json saying where each table came from. Existing tables are kept.
"""
from __future__ import annotations

import json
import os

import numpy as np

from moe_jax.routing import hashing

TABLE_DIR = 'hash_tables'


def table_path(root: str, kind: str, num_experts: int) -> str:
  return os.path.join(os.path.abspath(root), TABLE_DIR, f'{kind}_E{num_experts}.npy')


def token_counts(config) -> tuple[np.ndarray, dict]:
  """(counts [V], tokenizer info) of the training split a run config names."""
  from moe_jax.data.text import TextData
  data = TextData.from_config(config.data, objective=config.task.name,
                              batch_size=config.batch_size,
                              eval_batch_size=config.eval_batch_size, seed=config.seed)
  return data.train_token_counts(), dict(data.tokenizer_info)


def input_embeddings(workdir: str) -> np.ndarray:
  """[V, d] input token embeddings of the model trained in `workdir` (final checkpoint)."""
  from moe_jax.train import workdir as workdir_lib
  model, _ = workdir_lib.load_model(workdir)
  return np.asarray(model.embed.embedding[...], np.float32)


def build(kind: str, num_experts: int, *, counts=None, embeddings=None, seed: int = 0) -> np.ndarray:
  """The [V] table of a data-built hash kind."""
  if kind == 'balanced':
    return np.asarray(hashing.balanced_table_from_counts(counts, num_experts))
  if kind == 'clustered':
    return np.asarray(hashing.build_clustered_table(embeddings, num_experts, seed=seed))
  if kind == 'dispersed':
    return np.asarray(hashing.build_dispersed_table(embeddings, num_experts, seed=seed))
  raise ValueError(f'hash kind {kind!r} is not built from data; those are {hashing.TABLE_KINDS}.')


def prepare(*, exp, root: str, runs, train, num_experts: int,
            kinds=hashing.TABLE_KINDS, embedding_arm: str = 'dense', seed: int = 0) -> dict:
  """Builds the missing tables (see the module docstring); returns {kind: path}.

  Args:
    exp, root, runs, train: from the runner (`run.prepare`); `train(run)` finishes a run.
    num_experts: E of the tables (the hash arms' num_experts).
    kinds: which of 'balanced', 'clustered', 'dispersed' to build.
    embedding_arm: the arm whose seed-0 (first seed) run gives the data config and, for
      clustered / dispersed, the embeddings; trained first if needed.
    seed: k-means seed.
  """
  from moe_jax.experiments import run as run_lib
  paths = {k: table_path(root, k, num_experts) for k in kinds}
  todo = [k for k in kinds if not os.path.exists(paths[k])]
  if not todo:
    return paths
  source = next((r for r in runs if r.arm == embedding_arm), None)
  if source is None:
    raise ValueError(f'hash_tables.prepare: no arm {embedding_arm!r} in {exp.name}.')
  config = run_lib.run_config(exp, source)
  counts, info = token_counts(config)
  embeddings = None
  if {'clustered', 'dispersed'} & set(todo):
    if train(source) != 'done':
      raise RuntimeError(f'hash_tables.prepare: {source.name} did not finish, so its '
                         'embeddings cannot make the clustered / dispersed tables.')
    embeddings = input_embeddings(source.workdir(root))
  os.makedirs(os.path.dirname(paths[todo[0]]), exist_ok=True)
  for kind in todo:
    table = build(kind, num_experts, counts=counts, embeddings=embeddings, seed=seed)
    load = np.bincount(table, weights=counts[:len(table)], minlength=num_experts)
    manifest = dict(kind=kind, num_experts=num_experts, vocab_size=int(len(table)), seed=seed,
                    source=('train split token counts' if kind == 'balanced' else
                            f'input embeddings of {source.workdir(root)}'),
                    tokenizer_sha256=info.get('sha256'),
                    expert_sizes=np.bincount(table, minlength=num_experts).tolist(),
                    expert_token_mass=(load / max(load.sum(), 1)).round(4).tolist())
    hashing.save_table(paths[kind] + '.tmp.npy', table)
    os.replace(paths[kind] + '.tmp.npy', paths[kind])
    with open(os.path.splitext(paths[kind])[0] + '.json', 'w') as f:
      json.dump(manifest, f, indent=1)
    print(f'hash table {kind} (E={num_experts}): {paths[kind]}', flush=True)
  return paths

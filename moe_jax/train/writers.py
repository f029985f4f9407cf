"""Metric writers: clu's defaults (logs + TensorBoard event files) plus a JSON-lines file.

`metrics.jsonl` holds one `{"step": s, "name": value, ...}` object per write, which the
plotting scripts and the sweep runner read without TensorBoard: scalars, and, from
`write_histograms`, vectors as lists (each MoE layer's expert load,
'train/routing/<layer>/expert_load'). TensorBoard gets the vectors as histograms and
the routing pictures as images; the log shows neither. On resume `truncate_jsonl` drops
the lines after the restored step, so the file never holds two values for one step.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from clu import metric_writers
from clu.metric_writers import interface

JSONL = 'metrics.jsonl'


class JsonlWriter(interface.MetricWriter):
  """Appends scalars (and hparams) to <workdir>/metrics.jsonl."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, JSONL)

  def _append(self, obj: dict):
    with open(self.path, 'a') as f:
      f.write(json.dumps(obj) + '\n')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    self._append({'step': int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}})

  def write_hparams(self, hparams: Mapping[str, Any]):
    pass   # results.json holds the config

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    self._append({'step': int(step),
                  **{k: np.asarray(v, np.float64).tolist() for k, v in arrays.items()}})

  def flush(self):
    pass

  def close(self):
    pass


class _LoggingWriter(metric_writers.LoggingWriter):
  """clu's LoggingWriter without histograms and images (TensorBoard and metrics.jsonl
  hold them; in the log they are noise)."""

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_images(self, step, images):
    pass


def create_writer(workdir: str) -> interface.MetricWriter:
  """Logging + TensorBoard (+ JSONL) on process 0, logging only elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.AsyncMultiWriter([_LoggingWriter()])
  return metric_writers.AsyncMultiWriter([_LoggingWriter(),
                                          metric_writers.SummaryWriter(workdir),
                                          JsonlWriter(workdir)])


def read_jsonl(workdir: str) -> list[dict]:
  """The records of metrics.jsonl; a line that does not parse (a kill during a write
  leaves a half line) is skipped with a warning naming the file and line."""
  path = os.path.join(workdir, JSONL)
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        logging.warning('%s line %d is damaged (a partial write?); skipped.', path, i)
  return out


def write_json_atomic(path: str, obj) -> None:
  """Writes JSON to path.tmp and renames it over path: readers never see half a file."""
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(path + '.tmp', path)


def truncate_jsonl(workdir: str, last_step: int) -> None:
  """Keeps only the records with step <= last_step (call when resuming from last_step)."""
  path = os.path.join(workdir, JSONL)
  if jax.process_index() > 0 or not os.path.exists(path):   # process 0 owns the file
    return
  keep = [r for r in read_jsonl(workdir) if r['step'] <= last_step]
  with open(path + '.tmp', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in keep)
  os.replace(path + '.tmp', path)

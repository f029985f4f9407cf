"""`Task`: what is specific to one kind of training, so the trainer names none of it.

A task owns its data (train batches as a function of (seed, step), eval batches), the
batch keys it feeds the model, the loss with its per-example terms (REINFORCE rewards
are their negation), the eval metrics and the headline number a run reports.

    task = TASKS[config.task.name](config)     # validates its config fields; no data work
    task.prepare()                             # reads / prepares the data
    logits, aux = model(**task.model_inputs(batch))
    loss, per_example, metrics = task.loss(logits, batch)        # inside jit
    sums = task.eval_sums(logits, batch)                         # inside jit
    results = task.eval_metrics(summed)                          # on the host
    pictures = task.routing_pictures(batch, views, num_examples=2)   # on the host

Batches are dicts of numpy arrays holding this process's rows. `eval_sums` returns
sums over the batch (the trainer adds them over batches); the key 'weight' is the
number of examples (or target tokens) they cover, used to average the routing metrics.
Train metrics whose name starts with 'count/' are summed over a logging window and
reported per second as 'throughput/<name>_per_s' (examples, target tokens).
"""
from __future__ import annotations

from typing import Iterator

import jax
import ml_collections

Array = jax.Array


class Task:
  """Base class; subclasses set `name`, `headline` and implement the methods."""
  name: str = ''
  # (key in results['final'], how main.py prints it)
  headline: tuple[str, str] = ('', '')

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.validate_config(config)
    self.data = None

  # ------------------------------------------------------------------ set-up
  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the field for a bad task/data value (no I/O)."""

  def prepare(self) -> None:
    """Reads the data (and prepares it when it can)."""
    raise NotImplementedError

  def check_model(self, model) -> None:
    """Raises ConfigError when the built model does not fit the data (e.g. class count)."""

  # ------------------------------------------------------------------ data
  def train_iterator(self, start_step: int) -> Iterator[tuple[int, dict]]:
    return self.data.train_iterator(start_step)

  def eval_batches(self) -> Iterator[dict]:
    return self.data.eval_batches()

  def position(self, step: int) -> dict:
    """JSON data position saved with a checkpoint; the next batch depends on it alone."""
    return self.data.position(step)

  # ------------------------------------------------------------------ jitted parts
  def model_inputs(self, batch: dict) -> dict:
    """The keyword arguments of the model call."""
    raise NotImplementedError

  def loss(self, logits: Array, batch: dict) -> tuple[Array, Array, dict]:
    """(mean training loss, per-example loss [B], metrics) for one training batch."""
    raise NotImplementedError

  def eval_sums(self, logits: Array, batch: dict) -> dict:
    """Sums over one eval batch; must hold 'weight' (examples or tokens counted)."""
    raise NotImplementedError

  # ------------------------------------------------------------------ host side
  def eval_metrics(self, sums: dict) -> dict[str, float]:
    """Summed `eval_sums` over the eval set -> {'eval/<name>': value}."""
    raise NotImplementedError

  def final_metrics(self, last_eval: dict) -> dict[str, float]:
    """results['final'] from the last evaluation."""
    raise NotImplementedError

  def results_info(self) -> dict:
    """Extra entries for results.json (e.g. the tokenizer and its checksum)."""
    return {}

  def routing_pictures(self, batch: dict, views: dict, *, num_examples: int) -> list:
    """Pictures of where this batch's tokens went: `inspection.pictures.Picture`s.

    Args:
      batch: a host batch (numpy), e.g. the first eval batch.
      views: {layer name: `inspection.views.token_view`} of the batch's first B' rows
        (arrays [B', S, ...]).
      num_examples: how many examples to draw (tables may use all B' rows).
    Default: none.
    """
    return []

  @classmethod
  def headline_text(cls, results: dict) -> str:
    """'test accuracy 0.8910': the number a run reports, from its results."""
    key, label = cls.headline
    return f'{label} {results["final"][key]:.4f}'

"""Non-finite training steps: find them, name their first non-finite term.

The train step reports `nonfinite` (1 when its loss or gradient norm is not finite). With
`config.on_nonfinite='stop'` (default) the trainer checks every step's flag before any
checkpoint is written and stops at the first bad step, leaving the last good checkpoint
as the latest; with 'skip' the step keeps the previous state (no update, as large-scale
trainers skip a bad batch) and counts it, stopping after `config.max_skipped_steps`.
"""
from __future__ import annotations

import numpy as np

ACTIONS = ('stop', 'skip')


class DivergenceError(RuntimeError):
  """Training produced a non-finite loss or gradient; `step` and `term` say where."""

  def __init__(self, step: int, term: str, detail: str = ''):
    self.step, self.term = step, term
    super().__init__(f'training diverged at step {step}: {term} is not finite.{detail}')


def _bad(v) -> bool:
  """Whether a metric (a scalar, or a vector such as a layer's expert load) has a
  non-finite entry."""
  return not bool(np.all(np.isfinite(np.asarray(v, np.float64))))


def first_nonfinite_term(metrics: dict) -> str:
  """The first non-finite term of one step's metrics, in the order the loss is built:
  task loss, each MoE layer's aux losses, each MoE layer's routing outputs (computed from
  its router logits), the REINFORCE surrogate, the gradient norm."""
  if _bad(metrics.get('task_loss', 0.0)):
    return 'the task loss'
  routing = sorted(k for k in metrics if k.startswith('routing/'))
  for k in routing:
    if k.endswith('_weighted') and _bad(metrics[k]):
      layer, name = k[len('routing/'):-len('_weighted')].rsplit('/', 1)
      return f'aux loss {name!r} of MoE layer {layer}'
  for k in routing:
    if not k.endswith('_weighted') and _bad(metrics[k]):
      layer, name = k[len('routing/'):].rsplit('/', 1)
      return f"MoE layer {layer}'s router logits (its {name!r} is not finite)"
  if _bad(metrics.get('reinforce_loss', 0.0)):
    return 'the REINFORCE surrogate loss'
  if _bad(metrics.get('grad_norm', 0.0)):
    return 'the gradient norm'
  return 'the loss'


def first_bad_step(window: list[tuple[int, dict]]) -> tuple[int, str] | None:
  """(step, term) of the first step whose `nonfinite` flag is set, or None."""
  for step, m in window:
    if float(m.get('nonfinite', 0.0)) > 0 or _bad(m.get('loss', 0.0)):
      return step, first_nonfinite_term(m)
  return None

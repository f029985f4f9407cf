"""Derived per-run metrics: numbers a run's results.json gives only after some arithmetic.

An experiment config lists them (`derived`), each as

    dict(name='steps_to_dense', fn='steps_to_target', kwargs=dict(reference='dense'),
         higher_is_better=False, label='steps to reach dense\'s final quality')

and the summary reports each like the headline metric: mean ± sd per arm, and paired
differences with verdicts for comparisons that name it (`(A, B, 'steps_to_dense')`).

Every function here takes the run's row (`summary.collect`: final metrics, costs,
eval curve, train loss, extra evaluations), the rows of the same seed by arm (for
quantities relative to a reference arm: arms share seeds, so the reference is paired)
and its keyword arguments; it returns a float, or None when the value does not exist
for that run (a target never reached, a missing reference), which the summary leaves
out of the mean and the paired differences and counts in `n`.

Values are read with `value(row, key)`: 'metric' (the experiment's), a cost
('train_flops', 'train_time_s', 'process_cpu_s', 'step_time_s', 'steps_per_sec'),
'final.<key>' (results' final metrics), 'evals.<name>.<key>' (an extra evaluation's
final metrics) or the name of a derived metric computed before it in the list.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np


def value(row: dict, key: str) -> float | None:
  """A number of a run's row by key (see the module docstring); None when absent."""
  if key in row.get('derived', {}):
    v = row['derived'][key]
  elif key.startswith('final.'):
    v = row['final'].get(key[6:])
  elif key.startswith('evals.'):
    _, name, k = key.split('.', 2)
    v = (row.get('evals', {}).get(name) or {}).get(k)
  else:
    v = row.get(key)
  return None if v is None else float(v)


def _first_crossing(points: list[tuple[float, float, float]], target: float,
                    higher_is_better: bool) -> tuple[float, float] | None:
  """(step, seconds) where the curve [(step, quality, seconds)] first reaches `target`,
  linearly interpolated between the two evaluations around the crossing (at the first
  evaluation when that one already reaches it); None if it never does."""
  sign = 1.0 if higher_is_better else -1.0
  prev = None
  for step, q, secs in points:
    if q is not None and math.isfinite(q) and sign * (q - target) >= 0:
      if prev is None:
        return float(step), float(secs)
      (s0, q0, t0) = prev
      f = (target - q0) / (q - q0) if q != q0 else 1.0
      return s0 + f * (step - s0), t0 + f * (secs - t0)
    prev = (step, q, secs) if q is not None and math.isfinite(q) else prev
  return None


def steps_to_target(row: dict, by_arm: dict, *, reference: str, output: str = 'steps',
                    curve_key: str = 'metric', higher_is_better: bool = True) -> float | None:
  """Steps (or training seconds) the run needs to reach the reference arm's final quality.

  The target is the final value of the same seed's reference run (the runs are paired);
  the run's eval curve (`row['curve']`: step, quality, training seconds at each
  evaluation) is interpolated linearly to where it first reaches it (Switch Transformer
  Fig. 5's "steps to reach the dense model's quality").

  Args:
    reference: the arm whose final quality is the target (e.g. 'dense').
    output: 'steps', 'seconds', or 'speedup_steps' / 'speedup_seconds' (the reference's
      steps / seconds for its whole run divided by the run's).
    curve_key: which curve to read ('metric': the headline metric at each evaluation).
    higher_is_better: the direction of the curve's quality.
  """
  ref = by_arm.get(reference)
  if ref is None or not row.get('curve') or not ref.get('curve'):
    return None
  target = ref['curve'][-1][1]
  hit = _first_crossing([tuple(p) for p in row['curve']], target, higher_is_better)
  if hit is None:
    return None
  steps, seconds = hit
  if output == 'steps':
    return steps
  if output == 'seconds':
    return seconds
  if output == 'speedup_steps':
    return ref['curve'][-1][0] / max(steps, 1e-9)
  if output == 'speedup_seconds':
    return ref['curve'][-1][2] / max(seconds, 1e-9)
  raise ValueError(f"steps_to_target: output must be 'steps', 'seconds', 'speedup_steps' or "
                   f"'speedup_seconds', got {output!r}.")


def difference(row: dict, by_arm: dict, *, a: str, b: str) -> float | None:
  """value(a) − value(b) of the same run, e.g. a model evaluated with its training rule
  ('metric') and with a causal rule ('evals.causal.neg_log_perplexity')."""
  va, vb = value(row, a), value(row, b)
  return None if va is None or vb is None else va - vb


def ratio_to(row: dict, by_arm: dict, *, reference, key: str = 'step_time_s') -> float | None:
  """value(key) of the run / value(key) of the same seed's `reference` run (e.g. the step
  time relative to the arm with the fewest experts: Soft MoE paper Fig. 17/18).

  `reference`: an arm name, or a mapping group -> arm name (each method relative to its
  own reference arm; runs of other groups get None)."""
  if not isinstance(reference, str):
    reference = reference.get(row.get('group'))
  ref = by_arm.get(reference) if reference else None
  v, r = value(row, key), (None if ref is None else value(ref, key))
  return None if v is None or not r else v / r


def loss_spike(row: dict, by_arm: dict, *, threshold: float = 0.5, after_step: int = 0) -> float:
  """1.0 if training spiked or diverged, else 0.0.

  A spike: a logged training loss (`row['train_loss']`, the mean over each logging
  window) more than `threshold` nats above the lowest one logged before it, after
  `after_step`; divergence: any skipped non-finite step (`skipped_steps`, with
  `config.on_nonfinite='skip'`), a non-finite logged loss, or a run that stopped on a
  non-finite loss before finishing (`row['diverged']`).
  """
  if row.get('diverged') or row.get('skipped_steps'):
    return 1.0
  best = math.inf
  for step, loss in row.get('train_loss', []):
    if loss is None or not math.isfinite(loss):
      return 1.0
    if step > after_step and loss > best + threshold:
      return 1.0
    best = min(best, loss)
  return 0.0


def eval_routing(row: dict, by_arm: dict, *, name: str = 'router_logit_max',
                 reduce: str = 'max') -> float | None:
  """A routing metric of the final evaluation, over the model's MoE layers: the max or
  mean over layers of 'eval/routing/<layer>/<name>' (e.g. the largest router logit)."""
  last = row.get('last_eval') or {}
  vals = [v for k, v in last.items()
          if k.startswith('eval/routing/') and k.endswith(f'/{name}') and v is not None]
  if not vals:
    return None
  return float(np.max(vals) if reduce == 'max' else np.mean(vals))


def first_of(row: dict, by_arm: dict, *, keys: tuple[str, ...]) -> float | None:
  """The first of `keys` the run has, e.g. ('evals.causal.neg_log_perplexity', 'metric'):
  the causal-rule quality of arms evaluated twice and the plain metric of the others."""
  for k in keys:
    v = value(row, k)
    if v is not None:
      return v
  return None


DERIVED: dict[str, Callable] = {
    'first_of': first_of,
    'steps_to_target': steps_to_target,
    'difference': difference,
    'ratio_to': ratio_to,
    'loss_spike': loss_spike,
    'eval_routing': eval_routing,
    'value': lambda row, by_arm, *, key: value(row, key),
}


def compute(definitions, rows: list[dict]) -> None:
  """Adds `row['derived'][name]` for every definition, in order, to every row."""
  by_seed: dict[int, dict[str, dict]] = {}
  for r in rows:
    by_seed.setdefault(r['seed'], {})[r['arm']] = r
    r.setdefault('derived', {})
  for d in definitions:
    fn = DERIVED.get(d['fn'])
    if fn is None:
      raise ValueError(f"derived metric {d['name']!r}: unknown fn {d['fn']!r}; "
                       f'known: {sorted(DERIVED)}.')
    for r in rows:
      r['derived'][d['name']] = fn(r, by_seed[r['seed']], **dict(d.get('kwargs') or {}))

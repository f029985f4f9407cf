"""From finished runs to an experiment summary: rows, derived metrics, statistics, verdicts.

    rows = collect(exp, runs, root)       # one row per finished run (results.json + extras)
    summary = summarize(exp, rows)        # per arm mean ± sd; paired differences; verdicts

A row holds what the statistics and plots read: the headline metric, the costs
(training FLOPs, training time, process CPU time, seconds per step, steps per second),
the eval curve (step, headline metric, training seconds at each evaluation), the logged
training loss, skipped steps, each extra evaluation's final metrics (`evals`), the load
average around the run when the runner recorded it, and the derived metrics.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

from moe_jax.experiments import derived, stats

COSTS = ('train_flops', 'train_time_s', 'process_cpu_s', 'step_time_s', 'steps_per_sec')
RUN_INFO = 'run_info.json'
EVALS_DIR = 'evals'


def _curve_key(exp, results: dict) -> str | None:
  """The eval-history key of the headline metric: `exp.curve_key`, else the key whose
  value in the last evaluation equals the final metric."""
  if exp.get('curve_key'):
    return exp.curve_key
  last = results['eval_history'][-1] if results.get('eval_history') else {}
  final = results['final'][exp.metric]
  keys = [k for k, v in last.items() if k.startswith('eval/') and v == final]
  return keys[0] if keys else None


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def row_of(exp, run, workdir: str, results: dict) -> dict:
  """The summary row of one finished run."""
  key = _curve_key(exp, results)
  curve = [[e['step'], e.get(key), e.get('time/train_s')] for e in results.get('eval_history', [])
           ] if key else []
  steps = results['steps']
  evals = {}
  for name in [e['name'] for e in exp.get('evals', [])]:
    got = _read_json(os.path.join(workdir, EVALS_DIR, f'{name}.json'))
    evals[name] = None if got is None else got['final']
  info = _read_json(os.path.join(workdir, RUN_INFO)) or {}
  return dict(
      arm=run.arm, seed=run.seed, group=run.group, label=run.label, x=run.x,
      final=results['final'], metric=results['final'][exp.metric],
      train_flops=(results.get('train_flops') or {}).get('total'),
      train_time_s=results['train_time_s'], wall_time_s=results['wall_time_s'],
      process_cpu_s=results.get('process_cpu_s'), steps=steps,
      step_time_s=results['train_time_s'] / max(steps, 1),
      steps_per_sec=results.get('steps_per_sec'),
      params_total=results['params']['total'], params_active=results['params']['active'],
      skipped_steps=results.get('skipped_steps', 0), train_loss=results.get('train_loss', []),
      curve=curve, last_eval=(results.get('eval_history') or [{}])[-1], evals=evals,
      loadavg=info.get('loadavg'), environment=results['environment'])


def diverged_row(exp, run, reason: str) -> dict:
  """The row of a run that stopped on a non-finite loss: no metric, counted as diverged
  by `derived.loss_spike` (stability experiments count such runs)."""
  return dict(arm=run.arm, seed=run.seed, group=run.group, label=run.label, x=run.x,
              final={}, metric=None, diverged=reason, train_loss=[], curve=[], evals={},
              skipped_steps=0)


def collect(exp, runs, root: str) -> list[dict]:
  """One row per finished (or diverged) run, with the derived metrics."""
  rows = []
  for run in runs:
    wd = run.workdir(root)
    results = _read_json(os.path.join(wd, 'results.json'))
    if results is not None:
      rows.append(row_of(exp, run, wd, results))
    else:
      info = _read_json(os.path.join(wd, RUN_INFO)) or {}
      if info.get('diverged'):
        rows.append(diverged_row(exp, run, info['diverged']))
  derived.compute(exp.get('derived', []), rows)
  return rows


def _direction(exp, metric: str) -> bool:
  """higher_is_better of a comparison's metric."""
  if metric == 'metric':
    return exp.higher_is_better
  for d in exp.get('derived', []):
    if d['name'] == metric:
      return d.get('higher_is_better', True)
  if metric in ('train_flops', 'train_time_s', 'process_cpu_s', 'step_time_s'):
    return False
  return True


def _summary(values) -> dict:
  return dataclasses.asdict(stats.Summary.of(
      v for v in values if v is not None and math.isfinite(v)))


def comparison_spec(c) -> dict:
  """A comparison entry as a dict: (A, B), (A, B, metric) or
  dict(a, b, metric='metric', metric_b=metric, name_a=a, name_b=b). `metric_b` reads B's
  value from another key (one arm evaluated two ways: a=b='ec', metric='metric',
  metric_b='evals.causal.neg_log_perplexity'); the names are the verdict's words."""
  if isinstance(c, (tuple, list)):
    c = dict(a=c[0], b=c[1], metric=c[2] if len(c) > 2 else 'metric')
  c = dict(c)
  c.setdefault('metric', 'metric')
  c.setdefault('metric_b', c['metric'])
  c.setdefault('name_a', c['a'])
  c.setdefault('name_b', c['b'])
  return c


def comparison(exp, rows: list[dict], c) -> dict:
  """The paired difference A − B over shared seeds and its verdict (`comparison_spec`)."""
  c = comparison_spec(c)

  def by_seed(arm, metric):
    out = {}
    for r in rows:
      v = derived.value(r, metric) if r['arm'] == arm else None
      if v is not None and math.isfinite(v):
        out[r['seed']] = v
    return out
  hib = _direction(exp, c['metric'])
  d = stats.paired_difference(c['name_a'], c['name_b'], by_seed(c['a'], c['metric']),
                              by_seed(c['b'], c['metric_b']))
  return dict(dataclasses.asdict(d), arm_a=c['a'], arm_b=c['b'], metric=c['metric'],
              metric_b=c['metric_b'], higher_is_better=hib,
              verdict=stats.verdict(d, higher_is_better=hib))


def summarize(exp, rows: list[dict]) -> dict:
  """Per-arm mean ± sd of the metric, costs and derived metrics; paired differences."""
  arms = {}
  derived_names = [d['name'] for d in exp.get('derived', [])]
  for a in exp.arms:
    mine = [r for r in rows if r['arm'] == a['name']]
    entry = dict(group=a.get('group', a['name']), label=a.get('label', ''), x=a.get('x'),
                 seeds=[r['seed'] for r in mine],
                 metric=_summary(r['metric'] for r in mine))
    for cost in dict.fromkeys(tuple(exp.cost_axes) + COSTS):
      entry[cost] = _summary(r.get(cost) for r in mine)
    entry['derived'] = {n: _summary(r['derived'].get(n) for r in mine) for n in derived_names}
    entry['evals'] = {e['name']: {} for e in exp.get('evals', [])}
    for e in exp.get('evals', []):
      keys = {k for r in mine for k in (r['evals'].get(e['name']) or {})}
      entry['evals'][e['name']] = {k: _summary((r['evals'].get(e['name']) or {}).get(k)
                                               for r in mine) for k in sorted(keys)}
    entry['diverged'] = sum(1 for r in mine if r.get('diverged'))
    arms[a['name']] = entry
  comparisons = [comparison(exp, rows, c) for c in exp.comparisons]
  return dict(experiment=exp.name, config_file=exp.config_file, metric=exp.metric,
              metric_label=exp.metric_label or exp.metric, metric_scale=exp.metric_scale,
              higher_is_better=exp.higher_is_better, seeds=list(exp.seeds),
              cost_axes=list(exp.cost_axes), title=exp.title, notes=exp.get('notes', ''),
              derived=[dict(d) for d in exp.get('derived', [])],
              evals=[dict(e) for e in exp.get('evals', [])],
              sweep=dict(exp.sweep) if exp.get('sweep') else None,
              arms=arms, comparisons=comparisons,
              runs=[{k: v for k, v in r.items() if k != 'last_eval'} for r in rows])

r"""Runs an experiment config: every arm with every seed, then the summary and the plots.

    python -m moe_jax.experiments.run --experiment=experiments/vit_pareto.py:cpu
    python -m moe_jax.experiments.run --experiment=experiments/vit_pareto.py:cpu --dry_run
    python -m moe_jax.experiments.run --experiment=... --lock=/tmp/cpu.lock   # timed alone
    python -m moe_jax.experiments.run --experiment=... --estimate=60          # cost, measured
    python -m moe_jax.experiments.run --experiment=... --summarize_only

An experiment config (`get_config(variant)` in a file under experiments/) is an
ml_collections ConfigDict:

    name           'vit_pareto_cpu'
    root           workdir root of its runs (default workdirs/<name>): runs live in
                   <root>/<arm>/seed_<s>. Experiments that share a root share the runs of
                   identically named arms (a finished run whose config differs from the
                   arm's is an error, never silently reused).
    config_file    the run config file every arm uses ('configs/vit/fashion_mnist.py');
                   an arm may name its own (`config_file` in the arm)
    seeds          (0, 1, 2): every arm runs with each (`config.seed`), so arms are paired
    arms           [dict(name, config_arg, overrides={dotted key: value}, group, label,
                   x)]: `x` is the arm's position in a sweep plot (e.g. its expert count);
                   '{root}' in a string override becomes the root (files `prepare` made)
    comparisons    [(A, B) or (A, B, metric)]: paired differences A − B and verdicts
                   (stats.py) of the headline metric or of any cost / derived metric
    metric         key of results['final'] ('test_accuracy'); higher_is_better,
                   metric_label, metric_scale (100: plot percent); curve_key (the
                   eval-history key of the metric; found by value when unset)
    cost_axes      quantities plotted against ('train_flops', 'train_time_s', 'process_cpu_s')
    derived        [dict(name, fn, kwargs, higher_is_better, label)]: per-run metrics
                   computed from the results (`derived.py`: steps to a reference's final
                   quality, differences, ratios, loss spikes, eval routing metrics)
    evals          [dict(name, overrides, arms=None)]: each finished run of those arms
                   (all when None) is evaluated again from its final checkpoint with the
                   config overrides (`evals.py`), e.g. another routing rule; their final
                   metrics read as 'evals.<name>.<key>'
    prepare        [dict(fn='module:function', kwargs)]: run before the arms, e.g. hash
                   tables built from data (`hash_tables.py`); each gets (exp, root, runs,
                   train) and must skip work already done
    sweep          dict(x_label, panels=[quantities]): a second plot, each quantity against
                   the arms' `x`, one line per group (e.g. accuracy and step time against
                   the number of experts)
    notes, claims  the tuning budget and what the comparison reproduces (copied to the
                   summary; `reproductions.py` turns claims into the README table)
    summary, plot  output paths (JSON, PNG); title

A finished run is skipped, an interrupted one resumes where it stopped (rerun the same
command after an interruption); a run that diverged (exit status 3) is recorded as such
and not rerun. Runs execute one at a time in a subprocess (`python -m
moe_jax.train.main` with `arm_config.py`), so their times do not compete; with
`--lock=PATH` each holds an exclusive `flock` on PATH while it trains (other jobs that
take the same lock wait), and each run's load average before and after is recorded in
<workdir>/run_info.json and in the summary.
"""
from __future__ import annotations

import argparse
import json
import os

import ml_collections

from moe_jax.experiments import plots
# The public API of the runner, in one place.
from moe_jax.experiments.execute import (Diverged, arm_config_file, execute_in_process,  # noqa: F401
                                         execute_subprocess, locked, prepare, run_all, run_one)
from moe_jax.experiments.execute import _duration  # noqa: F401 (estimate.py)
from moe_jax.experiments.experiment import (COST_AXES, ROOT, Run, check_shared, config_for,  # noqa: F401
                                            expand, load_experiment, resolve, run_config, state)
from moe_jax.experiments.summary import collect, summarize  # noqa: F401


def write_outputs(exp: ml_collections.ConfigDict, summary: dict, *, summary_path: str | None = None,
                  plot_path: str | None = None) -> tuple[str, str]:
  """Writes the summary JSON, the Pareto plot and (with `exp.sweep`) the sweep plot
  (<plot>_sweep.png); returns (summary path, plot path)."""
  summary_path = summary_path or os.path.join(ROOT, exp.summary)
  plot_path = plot_path or os.path.join(ROOT, exp.plot)
  os.makedirs(os.path.dirname(summary_path), exist_ok=True)
  with open(summary_path, 'w') as f:
    json.dump(summary, f, indent=1)
  plots.pareto_plot(summary, plot_path)
  if summary.get('sweep'):
    plots.sweep_plot(summary, plots.sweep_path(plot_path))
  return summary_path, plot_path


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--experiment', required=True, help='experiments/<name>.py[:variant]')
  p.add_argument('--root', default=None, help="run workdirs (default: the config's root, "
                 'workdirs/<experiment name>)')
  p.add_argument('--summary', default=None, help='summary JSON (default: the config\'s)')
  p.add_argument('--plot', default=None, help='plot PNG (default: the config\'s)')
  p.add_argument('--dry_run', action='store_true', help='list the runs and their state only')
  p.add_argument('--summarize_only', action='store_true',
                 help='summarise the finished runs without running anything')
  p.add_argument('--lock', default=None, help='hold an exclusive flock on this file while '
                 'each run trains (e.g. /tmp/cpu.lock: timings taken alone)')
  p.add_argument('--estimate', type=int, default=None, metavar='STEPS',
                 help='measure each arm for STEPS steps (seed 0) and print the estimated cost')
  p.add_argument('--only', default=None, help='comma-separated arms: run (or estimate) these '
                 'only; the summary still covers every finished run')
  args = p.parse_args(argv)
  exp = load_experiment(args.experiment)
  root = args.root or exp.root
  runs = expand(exp, root)
  only = set(args.only.split(',')) if args.only else None
  if only and only - {a['name'] for a in exp.arms}:
    raise SystemExit(f'--only names unknown arms: {sorted(only - {a["name"] for a in exp.arms})}')
  if args.dry_run:
    for run in runs:
      print(f'{state(run, root):8s} {run.name:36s} {run.config_arg} {dict(run.overrides)}')
    return
  if args.estimate:
    from moe_jax.experiments import estimate
    estimate.main(exp, root, args.estimate, lock=args.lock, only=only)
    return
  if not args.summarize_only:
    run_all(exp, [r for r in runs if not only or r.arm in only], root, lock=args.lock)
  summary = summarize(exp, collect(exp, runs, root))
  summary_path, plot_path = write_outputs(exp, summary, summary_path=args.summary,
                                          plot_path=args.plot)
  for c in summary['comparisons']:
    metric = '' if c['metric'] == 'metric' else f" [{c['metric']}]"
    print(f"{c['a']} - {c['b']}{metric}: {c['mean']:+.4g} [{c['low']:+.4g}, {c['high']:+.4g}] "
          f"(n={c['n']}): {c['verdict']}")
  print(f'summary {summary_path}\nplot {plot_path}')


if __name__ == '__main__':
  main()

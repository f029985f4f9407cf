"""An experiment config: loading it, its runs (arm x seed), their configs and states.

See `moe_jax.experiments.run` for the fields of an experiment config.
"""
from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from moe_jax.experiments import summary as summary_lib
from moe_jax.train import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COST_AXES = ('train_flops', 'train_time_s', 'process_cpu_s')


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: an arm of the experiment with one seed."""
  arm: str
  seed: int
  config_arg: str
  overrides: tuple[tuple[str, object], ...]
  group: str = ''
  label: str = ''
  config_file: str = ''
  x: float | None = None

  @property
  def name(self) -> str:
    return f'{self.arm}/seed_{self.seed}'

  def workdir(self, root: str) -> str:
    return os.path.join(root, self.arm, f'seed_{self.seed}')

  def all_overrides(self) -> dict:
    return {**dict(self.overrides), 'seed': self.seed}


def resolve(path: str) -> str:
  """A path as given (absolute or from the working directory), else from the repository."""
  return path if os.path.exists(path) else os.path.join(ROOT, path)


def load_experiment(spec: str) -> ml_collections.ConfigDict:
  """'experiments/vit_pareto.py:cpu' -> the experiment ConfigDict (defaults filled in)."""
  path, _, variant = spec.partition(':')
  module = config_lib.load_config_module(resolve(path))
  exp = module.get_config(variant or None)
  defaults = dict(seeds=(0, 1, 2), comparisons=[], metric='test_accuracy', higher_is_better=True,
                  metric_label=None, metric_scale=1.0, cost_axes=COST_AXES, title=exp.name,
                  root=os.path.join('workdirs', exp.name),
                  summary=f'experiments/results/{exp.name}.json',
                  plot=f'experiments/plots/{exp.name}.png')
  for k, v in defaults.items():
    if k not in exp:
      exp[k] = v
  names = [a['name'] for a in exp.arms]
  if len(set(names)) != len(names):
    raise ValueError(f'experiment {exp.name}: arm names repeat: {names}.')
  metrics = {'metric', *summary_lib.COSTS, *(d['name'] for d in exp.get('derived', []))}
  for c in exp.comparisons:
    spec = summary_lib.comparison_spec(c)
    for arm in (spec['a'], spec['b']):
      if arm not in names:
        raise ValueError(f'experiment {exp.name}: comparison {c} names unknown arm '
                         f'{arm!r}; arms: {names}.')
    for m in (spec['metric'], spec['metric_b']):
      if m not in metrics and not m.startswith(('final.', 'evals.')):
        raise ValueError(f'experiment {exp.name}: comparison {c} names unknown metric '
                         f'{m!r}; known: {sorted(metrics)}, final.<key>, evals.<name>.<key>.')
  for e in exp.get('evals', []):
    unknown = set(e.get('arms') or []) - set(names)
    if unknown:
      raise ValueError(f"experiment {exp.name}: eval {e['name']!r} names unknown arms "
                       f'{sorted(unknown)}.')
  return exp


def _substitute(value, root: str | None):
  if root is not None and isinstance(value, str) and '{root}' in value:
    return value.replace('{root}', os.path.abspath(root))
  return value


def expand(exp: ml_collections.ConfigDict, root: str | None = None) -> list[Run]:
  """Every (arm, seed) of the experiment, arm-major (all seeds of an arm run together);
  '{root}' in string overrides becomes `root` (absolute) when given."""
  return [Run(arm=a['name'], seed=int(s), config_arg=a['config_arg'],
              overrides=tuple(sorted((k, _substitute(v, root))
                                     for k, v in dict(a.get('overrides') or {}).items())),
              group=a.get('group', a['name']), label=a.get('label', ''),
              config_file=a.get('config_file') or exp.config_file, x=a.get('x'))
          for a in exp.arms for s in exp.seeds]


def run_config(exp: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
  """The run's ConfigDict: the config file's get_config(arg) plus the run's overrides."""
  return config_for(run.config_file or exp.config_file, run.config_arg, run.all_overrides())


def config_for(config_file: str, config_arg: str, overrides: dict) -> ml_collections.ConfigDict:
  module = config_lib.load_config_module(resolve(config_file))
  return config_lib.apply_overrides(module.get_config(config_arg), overrides)


def _config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def state(run: Run, root: str) -> str:
  """'done' (results.json), 'diverged' (stopped on a non-finite loss), 'partial'
  (checkpoints only) or 'todo'."""
  wd = run.workdir(root)
  if os.path.exists(os.path.join(wd, 'results.json')):
    return 'done'
  info = os.path.join(wd, summary_lib.RUN_INFO)
  if os.path.exists(info):
    with open(info) as f:
      if json.load(f).get('diverged'):
        return 'diverged'
  ckpt = os.path.join(wd, 'checkpoints')
  return 'partial' if os.path.isdir(ckpt) and os.listdir(ckpt) else 'todo'


def check_shared(exp: ml_collections.ConfigDict, runs: list[Run], root: str) -> None:
  """ValueError if a finished run in `root` holds another config than its arm's (another
  experiment sharing the root defined an arm of the same name differently)."""
  for run in runs:
    path = os.path.join(run.workdir(root), 'results.json')
    if not os.path.exists(path):
      continue
    with open(path) as f:
      have = json.load(f)['config']
    want = _config_json(run_config(exp, run))
    if have != want:
      diff = sorted(_diff(have, want))
      raise ValueError(f'{run.workdir(root)} holds a finished run whose config differs from arm '
                       f'{run.arm!r} of {exp.name}: {diff[:5]}. Rename the arm or use another '
                       'root.')


def _diff(a, b, prefix=''):
  if isinstance(a, dict) and isinstance(b, dict):
    for k in set(a) | set(b):
      yield from _diff(a.get(k), b.get(k), f'{prefix}{k}.')
  elif a != b:
    yield f'{prefix[:-1]}: {a!r} in the workdir, {b!r} in the arm'

"""`train_and_evaluate(config, workdir)`: the training loop, for any task and model.

    validate config -> task (TASKS[config.task.name]) prepares its data -> model
    (MODELS[config.model.name]) + AdamW -> restore the latest checkpoint (if any) ->
    compile the step (XLA cost analysis + MoE formula -> FLOPs) -> loop: step, log,
    evaluate, checkpoint -> final evaluation -> <workdir>/results.json

A run resumes from its workdir's latest checkpoint with the data position restored
(batches are a function of (seed, step)), so an interrupted run continues exactly as
the uninterrupted one would. SIGTERM / Ctrl-C save a checkpoint and stop cleanly.

`config.mesh` (see `device_mesh.py`) trains on a device mesh: the state is placed with
experts over `expert`, each batch split over (`data`, `expert`), the steps traced under
`jax.set_mesh`; a checkpoint restores onto whatever mesh the resuming run uses.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import signal
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from flax import nnx

from moe_jax import tasks
from moe_jax.train import checkpoint, config_lib, device_mesh, flops, steps, upcycle, writers
from moe_jax.train.builders import build_model, build_optimizer

RESULTS = 'results.json'


class _StopFlag:
  """Set by SIGTERM / SIGINT; the loop checkpoints and returns at the next step boundary."""

  def __init__(self):
    self.stop, self._old = False, {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:   # not the main thread: no handlers
        pass
    return self

  def _handle(self, signum, frame):
    if self.stop:                       # second signal: give up at once
      raise KeyboardInterrupt
    logging.warning('Signal %d: checkpointing and stopping after this step.', signum)
    self.stop = True

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def restore_or_init(mngr, state, config=None) -> tuple:
  """(state, meta) from the latest checkpoint, or (state, None) for a fresh run.

  The one place a run's initial state comes from. A fresh run with
  `config.init_from.dense_workdir` set starts from that dense run's upcycled weights.
  """
  restored = checkpoint.restore_latest(mngr, state)
  if restored is not None:
    return restored
  init = config.get('init_from') if config is not None else None
  if init is not None and init.get('dense_workdir'):
    logging.info('Upcycling the dense checkpoint of %s.', init.dense_workdir)
    state = upcycle.upcycle_train_state(config, state)
  return state, None


def evaluate(eval_step, model_state, task, mesh=None) -> dict[str, float]:
  """The task's metrics over its whole eval set (+ routing metrics in eval mode)."""
  sums = None
  for batch in task.eval_batches():
    out = eval_step(model_state, device_mesh.put_batch(mesh, batch))
    sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
  sums = jax.device_get(sums)
  res = task.eval_metrics(sums)
  n = float(sums['weight'])
  res.update({f'eval/{k}': float(v) / n for k, v in sums.items() if k.startswith('routing/')})
  return res


def _mean_metrics(window: list, seconds: float) -> dict[str, float]:
  """Means over the window; 'count/x' metrics become 'throughput/x_per_s' (sums / seconds)."""
  host = jax.device_get(window)
  out = {}
  for k in host[0]:
    if k.startswith('count/'):
      out[f'throughput/{k[6:]}_per_s'] = float(np.sum([m[k] for m in host])) / max(seconds, 1e-9)
    else:
      out[f'train/{k}'] = float(np.mean([m[k] for m in host]))
  return out


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None) -> dict | None:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint).

  Args:
    config: a run config (e.g. `configs/vit/fashion_mnist.py`; fields in
      `config_lib.base_config` and the family's base).
    workdir: checkpoints, TensorBoard events, metrics.jsonl and results.json go here.
    stop_at_step: stop (with a checkpoint) after this step, as an interruption would.

  Returns:
    The results dict also written to results.json, or None when stopped early.
  """
  config_lib.validate(config)
  mesh = device_mesh.trainer_mesh(config)
  with device_mesh.mesh_context(mesh):
    return _train_and_evaluate(config, workdir, stop_at_step, mesh)


def _train_and_evaluate(config, workdir, stop_at_step, mesh):
  session_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  done = load_results(workdir)
  if done is not None and done['config'] == _config_json(config):
    logging.info('%s already holds the finished run: %s', workdir, done['final'])
    return done
  task = tasks.TASKS[config.task.name](config)
  task.prepare()

  model = build_model(config, rngs=nnx.Rngs(config.seed))
  device_mesh.check_model_fits(mesh, model)
  tx, schedule = build_optimizer(config)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  device_mesh.place_state(mesh, model, optimizer)
  train_step = steps.make_train_step(model, optimizer, schedule, task)
  eval_step = steps.make_eval_step(model, task)
  mngr = checkpoint.make_manager(workdir, every=config.checkpoint_every_steps,
                                 keep=config.keep_checkpoints)
  state, meta = restore_or_init(mngr, nnx.state((model, optimizer)), config)
  if meta is None:
    meta = dict(step=0, data=task.position(0), train_time_s=0.0, wall_time_s=0.0, eval=[])
    writers.truncate_jsonl(workdir, -1)
  else:
    if meta['data']['seed'] != config.seed:
      raise ValueError(f"{workdir} was trained with seed {meta['data']['seed']}, the config has "
                       f'{config.seed}: use a new workdir or the same seed.')
    writers.truncate_jsonl(workdir, meta['step'])
    logging.info('Resumed from step %d (data position %s).', meta['step'], meta['data'])
  start = meta['step']
  nnx.update((model, optimizer), state)

  writer = writers.create_writer(workdir)
  if start == 0:
    writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()})
    logging.info('\n%s', parameter_overview.get_parameter_overview(
        nnx.state(model, nnx.Param).to_pure_dict(), include_stats=False))

  it = ((s, device_mesh.put_batch(mesh, b)) for s, b in task.train_iterator(start))
  first = next(it)
  compile_start = time.time()
  compiled = train_step.lower(state, first[1]).compile()
  compile_s = time.time() - compile_start
  step_flops = None
  moe_calls = flops.moe_calls(model, task.model_inputs(first[1]))
  if config.count_flops:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    step_flops = flops.train_step_flops(float(ca.get('flops', 0.0)), moe_calls,
                                        devices=1 if mesh is None else mesh.size)
  params = flops.param_counts(model, moe_calls)
  logging.info('params %s; train step %.3g FLOPs; compiled in %.1fs', params,
               step_flops['train_step'] if step_flops else float('nan'), compile_s)

  num_steps = config.num_train_steps
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_steps=config.log_every_steps)
  hooks = [report] if jax.process_index() == 0 else []
  window, stopped = [], False
  train_time = window_time = 0.0
  with metric_writers.ensure_flushes(writer), _StopFlag() as flag:
    step = start
    batch_iter = _chain(first, it)
    while step < num_steps:
      t0 = time.time()
      _, batch = next(batch_iter)
      state, metrics = compiled(state, batch)
      window.append(metrics)
      step += 1
      log_now = step % config.log_every_steps == 0 or step == num_steps
      eval_now = step % config.eval_every_steps == 0 or step == num_steps
      if log_now or eval_now:
        jax.block_until_ready(metrics)   # so the step's time is counted as training time
      train_time += time.time() - t0
      window_time += time.time() - t0
      if log_now:
        means = _mean_metrics(window, window_time)
        writer.write_scalars(step, means)
        # Every process holds the (replicated) loss: results.json of any process has the curve.
        meta.setdefault('train_loss', []).append([step, means['train/loss']])
        window, window_time = [], 0.0
      for h in hooks:
        h(step)
      if eval_now:
        with report.timed('eval'):
          ev = evaluate(eval_step, state[0], task, mesh)
        ev['time/train_s'] = meta['train_time_s'] + train_time
        ev['time/process_cpu_s'] = _cpu_seconds()
        writer.write_scalars(step, ev)
        meta['eval'].append({'step': step, **ev})
      stopped = flag.stop or step == stop_at_step
      meta.update(step=step, data=task.position(step))
      meta['train_time_s'] += train_time
      meta['wall_time_s'] += time.time() - session_start
      train_time, session_start = 0.0, time.time()
      checkpoint.save(mngr, step, state, meta, force=stopped or step == num_steps)
      if stopped and step < num_steps:
        break
  mngr.wait_until_finished()
  mngr.close()
  nnx.update((model, optimizer), state)
  if step < num_steps:
    logging.info('Stopped at step %d of %d; rerun the same command to resume.', step, num_steps)
    return None
  results = _results(config, meta, params, step_flops, compile_s, task)
  if jax.process_index() == 0:   # one writer for the shared workdir
    with open(os.path.join(workdir, RESULTS + '.tmp'), 'w') as f:
      json.dump(results, f, indent=1)
    os.replace(os.path.join(workdir, RESULTS + '.tmp'), os.path.join(workdir, RESULTS))
  logging.info('Final: %s', {k: v for k, v in results['final'].items()})
  return results


def load_results(workdir: str) -> dict | None:
  """The results.json of a finished run in `workdir`, or None."""
  path = os.path.join(workdir, RESULTS)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _cpu_seconds() -> float:
  """User + system CPU time of this process (all threads) so far."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _chain(first, it):
  yield first
  yield from it


def _flat(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out


def _results(config, meta, params, step_flops, compile_s, task) -> dict:
  n = config.num_train_steps
  last_eval = meta['eval'][-1]
  train_flops = None
  if step_flops:
    train_flops = dict(total=step_flops['train_step'] * n,
                       per_step=step_flops['train_step'],
                       per_example=step_flops['train_step'] / config.batch_size,
                       xla_train_step=step_flops['xla_train_step'],
                       moe_xla_train=step_flops['moe_xla_train'],
                       moe_formula_train=step_flops['moe_formula_train'],
                       moe_layers=step_flops['layers'])
  return dict(
      config=_config_json(config), steps=n, examples_seen=n * config.batch_size,
      params=params, train_flops=train_flops,
      wall_time_s=meta['wall_time_s'], train_time_s=meta['train_time_s'],
      steps_per_sec=n / max(meta['train_time_s'], 1e-9), last_compile_s=compile_s,
      process_cpu_s=_cpu_seconds(),
      final=task.final_metrics(last_eval), task=task.name, headline=task.headline[0],
      eval_history=meta['eval'], train_loss=meta.get('train_loss', []), **task.results_info(),
      environment=dict(jax=jax.__version__, backend=jax.default_backend(),
                       device=jax.devices()[0].device_kind, num_devices=jax.device_count(),
                       cpu_count=os.cpu_count(), machine=platform.machine()))

"""`train_and_evaluate(config, workdir)`: the training loop, for any task and model.

    validate the config (nothing is created before it passes) -> the task
    (TASKS[config.task.name]) prepares its data -> the model (MODELS[config.model.name])
    + AdamW, checked abstractly on a real batch -> restore the newest intact checkpoint
    (if any; its config compared with this one) -> compile the step (XLA cost analysis +
    MoE formula -> FLOPs) -> loop: step, log, evaluate, check for non-finite steps,
    checkpoint -> final evaluation -> <workdir>/results.json

Logged: scalars (TensorBoard, metrics.jsonl), every MoE layer's expert-load vector
(TensorBoard histograms, lists in metrics.jsonl) and, at every evaluation, the routing
pictures of `config.routing_pictures` eval examples (`Task.routing_pictures`) with the
load heat map (TensorBoard images 'routing/...').

A run resumes from its workdir's newest intact checkpoint with the data position
restored (batches are a function of (seed, step)), so an interrupted run continues
exactly as the uninterrupted one would. SIGTERM / Ctrl-C save a checkpoint and stop
cleanly (`Stopped` result). A damaged checkpoint costs only the steps since the previous
one (`checkpoint.restore_latest`); a non-finite loss stops the run before it is
checkpointed (`divergence.py`); a resumed run refuses a changed config unless allowed
(`resume.py`).

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
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from flax import nnx

from moe_jax import tasks
from moe_jax.errors import ConfigError
from moe_jax.train import (checkpoint, config_lib, device_mesh, divergence, flops, resume, steps,
                           upcycle, writers)
from moe_jax.train.builders import build_model, build_optimizer

RESULTS = 'results.json'


class _StopFlag:
  """Set by SIGTERM / SIGINT; the loop checkpoints and returns at the next step boundary."""

  def __init__(self):
    self.stop, self.signal, self._old = False, None, {}

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
    self.stop, self.signal = True, signum

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def restore_or_init(mngr, state, config, workdir: str, *, strict: bool = False,
                    allow_config_change: bool = False) -> tuple:
  """(state, meta) from the newest intact checkpoint, or (state, None) for a fresh run.

  The one place a run's initial state comes from. The checkpoint's config is compared
  with `config` first (`resume.py`). A fresh run with `config.init_from.dense_workdir`
  set starts from that dense run's upcycled weights.
  """
  new_config = _config_json(config)
  seen = {}

  def check_meta(step, meta):
    old = meta.get('config')
    seen['changes'] = {} if old is None else resume.config_changes(old, new_config)
    resume.check_changes(workdir, step, seen['changes'], allow=True)   # seed only, here

  try:
    restored = checkpoint.restore_latest(mngr, state, strict=strict, check_meta=check_meta)
  except checkpoint.ShapeMismatch as e:
    raise resume.shape_change_error(workdir, e.step, seen.get('changes', {}), e.mismatches) from None
  if restored is not None:
    changes = seen.get('changes', {})
    resume.check_changes(workdir, restored.step, changes, allow=allow_config_change)
    meta = restored.meta
    if restored.damaged:
      meta.setdefault('damaged_checkpoints', []).extend(
          {'step': s, 'reason': r, 'fell_back_to': restored.step} for s, r in restored.damaged)
    if changes:
      logging.warning('Continuing %s from step %d with a changed config: %s', workdir,
                      restored.step, resume.describe(changes))
      meta.setdefault('config_changes', []).append(
          {'step': restored.step, 'changes': {k: list(v) for k, v in changes.items()}})
    return restored.state, meta
  if config.init_from.get('dense_workdir'):
    logging.info('Upcycling the dense checkpoint of %s.', config.init_from.dense_workdir)
    state = upcycle.upcycle_train_state(config, state)
  return state, None


class Evaluation(NamedTuple):
  """One evaluation: scalars, load vectors, and what the routing pictures are drawn from."""
  metrics: dict[str, float]        # the task's 'eval/...' + 'eval/routing/...' scalars
  vectors: dict[str, np.ndarray]   # 'eval/routing/<layer>/expert_load' [E]
  batch: dict | None               # the first eval batch (host)
  views: dict                      # its first examples' routing views ({} if not asked)


def evaluate(eval_step, model_state, task, mesh=None) -> Evaluation:
  """The task's metrics over its whole eval set (+ routing metrics in eval mode)."""
  sums, first, views = None, None, {}
  for batch in task.eval_batches():
    out = eval_step(model_state, device_mesh.put_batch(mesh, batch))
    batch_views = out.pop('routing_views', None)
    if first is None:
      first, views = batch, batch_views or {}
    sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
  sums = jax.device_get(sums)
  res = task.eval_metrics(sums)
  n = float(sums['weight'])
  vectors = {}
  for k, v in sums.items():
    if k.startswith('routing/'):
      if np.ndim(v):
        vectors[f'eval/{k}'] = np.asarray(v, np.float64) / n
      else:
        res[f'eval/{k}'] = float(v) / n
  return Evaluation(res, vectors, first, jax.device_get(views))


def _split_vectors(metrics: dict) -> tuple[dict, dict]:
  """(scalars, vectors): vectors (expert load) go to histograms, not scalar summaries."""
  vectors = {k: v for k, v in metrics.items() if np.ndim(v)}
  return {k: v for k, v in metrics.items() if k not in vectors}, vectors


def _routing_pictures(writer, workdir: str, step: int, task, ev: Evaluation, examples: int):
  """The task's routing pictures of the first eval examples and the train load heat map,
  as TensorBoard images 'routing/<name>'. A failure is logged; training goes on."""
  from moe_jax.inspection import load   # matplotlib: only when pictures are drawn
  try:
    pictures = task.routing_pictures(ev.batch, ev.views, num_examples=examples) if ev.views else []
    writer.flush()                      # metrics.jsonl complete up to this step
    heat = load.load_picture(writers.read_jsonl(workdir), 'train')
    pictures += [heat] if heat is not None else []
  except Exception:  # noqa: BLE001  (a picture must never stop a run)
    logging.exception('Routing pictures at step %d failed; training continues.', step)
    return
  images = {f'routing/{p.name}': p.png[None] for p in pictures if p.png is not None}
  if images:
    writer.write_images(step, images)


def _mean_metrics(window: list, seconds: float) -> dict[str, float]:
  """Means over the window; 'count/x' metrics become 'throughput/x_per_s' (sums / seconds)."""
  host = [m for _, m in window]
  out = {}
  for k in host[0]:
    if k.startswith('count/'):
      out[f'throughput/{k[6:]}_per_s'] = float(np.sum([m[k] for m in host])) / max(seconds, 1e-9)
    elif np.ndim(host[0][k]):     # a vector (expert load): the mean of each entry
      out[f'train/{k}'] = np.mean(np.asarray([m[k] for m in host], np.float64), axis=0)
    else:
      out[f'train/{k}'] = float(np.mean([m[k] for m in host]))
  return out


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def check_workdir(workdir: str) -> None:
  """ConfigError unless `workdir` exists and is writable or can be created (creates nothing)."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f'{workdir} exists and is not a directory.', field='workdir')
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise ConfigError(f'{probe} is a file, so {workdir} cannot be created; choose another '
                      '--workdir.', field='workdir')
  if not os.access(probe, os.W_OK | os.X_OK):
    raise ConfigError(f'{probe} is not writable, so {workdir} cannot be '
                      f'{"written" if probe == path else "created"}; choose another --workdir.',
                      field='workdir')


def _check_forward(model, task, batch) -> None:
  """Traces the training forward pass on the real batch's shapes (nothing runs):
  a value that only fails at trace time (a routing group that does not divide the
  batch, a hash table for another vocabulary) is reported before any work."""
  inputs = task.model_inputs(batch)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), inputs)
  try:
    jax.eval_shape(lambda m, kw: m(**kw), model, abstract)
  except ConfigError:
    raise
  except (ValueError, TypeError, ArithmeticError) as e:
    raise ConfigError(str(e), field='config.model') from None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None, strict_restore: bool = False,
                       allow_config_change: bool = False) -> dict | None:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint).

  Args:
    config: a run config (e.g. `configs/vit/fashion_mnist.py`; fields in
      `config_lib.base_config` and the family's base).
    workdir: checkpoints, TensorBoard events, metrics.jsonl and results.json go here.
    stop_at_step: stop (with a checkpoint) after this step, as an interruption would.
    strict_restore: a damaged newest checkpoint stops the run (CheckpointError) instead
      of falling back to the newest intact one.
    allow_config_change: resume with non-shape config changes (recorded in results.json).

  Returns:
    The results dict also written to results.json, or None when stopped early (by
    `stop_at_step` or a signal).

  Raises:
    ConfigError (bad config, before anything is created), checkpoint.CheckpointError,
    divergence.DivergenceError.
  """
  config_lib.validate(config)
  check_workdir(workdir)
  mesh = device_mesh.trainer_mesh(config)
  with device_mesh.mesh_context(mesh):
    return _train_and_evaluate(config, workdir, stop_at_step, mesh, strict_restore,
                               allow_config_change)


def _train_and_evaluate(config, workdir, stop_at_step, mesh, strict_restore, allow_config_change):
  session_start = time.time()
  done = load_results(workdir)
  if done is not None and done['config'] == _config_json(config):
    logging.info('%s already holds the finished run: %s', workdir, done['final'])
    return done
  task = tasks.TASKS[config.task.name](config)
  task.prepare()

  model = build_model(config, rngs=nnx.Rngs(config.seed))
  device_mesh.check_model_fits(mesh, model)
  _check_forward(model, task, device_mesh.put_batch(mesh, next(task.train_iterator(0))[1]))
  tx, schedule = build_optimizer(config)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  device_mesh.place_state(mesh, model, optimizer)
  train_step = steps.make_train_step(model, optimizer, schedule, task,
                                     skip_nonfinite=config.on_nonfinite == 'skip')
  eval_step = steps.make_eval_step(model, task, picture_examples=config.get('routing_pictures', 0))

  os.makedirs(workdir, exist_ok=True)          # everything above is checked: now create
  mngr = checkpoint.make_manager(workdir, every=config.checkpoint_every_steps,
                                 keep=config.keep_checkpoints)
  try:
    state, meta = restore_or_init(mngr, nnx.state((model, optimizer)), config, workdir,
                                  strict=strict_restore, allow_config_change=allow_config_change)
  except BaseException:
    mngr.close()
    _remove_if_empty(workdir)
    raise
  if meta is None:
    meta = dict(step=0, data=task.position(0), train_time_s=0.0, wall_time_s=0.0, eval=[])
    writers.truncate_jsonl(workdir, -1)
  else:
    writers.truncate_jsonl(workdir, meta['step'])
    logging.info('Resumed from step %d (data position %s).', meta['step'], meta['data'])
  meta['config'] = _config_json(config)
  meta.update(task.results_info())   # e.g. the tokenizer: scripts read it from any checkpoint
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
  # A resumed run continues the logging window it was in, so its logged means are the
  # uninterrupted run's.
  window = [(s, m) for s, m in meta.get('log_window', [])]
  window_time = meta.get('log_window_time', 0.0)
  unchecked, stopped = [], False
  train_time = 0.0
  skipped = meta.get('skipped_steps', 0)
  with metric_writers.ensure_flushes(writer), _StopFlag() as flag:
    step = start
    batch_iter = _chain(first, it)
    try:
      while step < num_steps:
        t0 = time.time()
        _, batch = next(batch_iter)
        state, metrics = compiled(state, batch)
        step += 1
        window.append((step, metrics))
        unchecked.append((step, metrics))
        log_now = step % config.log_every_steps == 0 or step == num_steps
        eval_now = step % config.eval_every_steps == 0 or step == num_steps
        stopped = flag.stop or step == stop_at_step
        save_now = stopped or step == num_steps or mngr.should_save(step)
        if log_now or eval_now or save_now:
          jax.block_until_ready(metrics)   # so the step's time is counted as training time
        train_time += time.time() - t0
        window_time += time.time() - t0
        if log_now or eval_now or save_now:
          # Before anything is written: a non-finite step never reaches a checkpoint.
          host = jax.device_get(unchecked)
          unchecked = []
          skipped = _check_finite(config, host, skipped, step)
          window = jax.device_get(window)
        if log_now:
          means = _mean_metrics(window, window_time)
          scalars, vectors = _split_vectors(means)
          writer.write_scalars(step, scalars)
          if vectors:
            writer.write_histograms(step, vectors)
          # Every process holds the (replicated) loss: results.json of any process has it.
          meta.setdefault('train_loss', []).append([step, means['train/loss']])
          window, window_time = [], 0.0
        if save_now or log_now:
          meta['log_window'] = [[s, {k: np.asarray(v).tolist() for k, v in m.items()}]
                                for s, m in window]
          meta['log_window_time'] = window_time
        for h in hooks:
          h(step)
        if eval_now:
          with report.timed('eval'):
            evaluation = evaluate(eval_step, state[0], task, mesh)
          ev = dict(evaluation.metrics)
          ev['time/train_s'] = meta['train_time_s'] + train_time
          ev['time/process_cpu_s'] = _cpu_seconds()
          writer.write_scalars(step, ev)
          if evaluation.vectors:
            writer.write_histograms(step, evaluation.vectors)
          meta['eval'].append({'step': step, **ev})
          pictures = config.get('routing_pictures', 0)
          if pictures and jax.process_index() == 0:
            with report.timed('pictures'):
              _routing_pictures(writer, workdir, step, task, evaluation, pictures)
        meta.update(step=step, data=task.position(step), skipped_steps=skipped)
        meta['train_time_s'] += train_time
        meta['wall_time_s'] += time.time() - session_start
        train_time, session_start = 0.0, time.time()
        checkpoint.save(mngr, step, state, meta, force=stopped or step == num_steps)
        if stopped and step < num_steps:
          break
    finally:
      mngr.wait_until_finished()
      mngr.close()
  nnx.update((model, optimizer), state)
  if step < num_steps:
    why = f'signal {flag.signal}' if flag.signal else f'stop_at_step={stop_at_step}'
    logging.warning('Stopped at step %d of %d (%s); rerun the same command to resume.', step,
                    num_steps, why)
    return None
  results = _results(config, meta, params, step_flops, compile_s, task)
  if jax.process_index() == 0:   # one writer for the shared workdir
    writers.write_json_atomic(os.path.join(workdir, RESULTS), results)
  logging.info('Final: %s', {k: v for k, v in results['final'].items()})
  return results


def _check_finite(config, host_window: list, skipped: int, step: int) -> int:
  """Raises DivergenceError at the first non-finite step ('stop'), or counts the skipped
  steps ('skip') and raises past `config.max_skipped_steps`. Returns the new count."""
  bad = divergence.first_bad_step(host_window)
  if bad is None:
    return skipped
  if config.on_nonfinite == 'stop':
    raise divergence.DivergenceError(*bad, detail=(
        ' The last checkpoint holds the last good state. Lower the learning rate, or set '
        "--config.on_nonfinite=skip to skip such steps."))
  n = sum(float(m.get('nonfinite', 0.0)) > 0 for _, m in host_window)
  logging.warning('Skipped %d non-finite step(s) up to step %d (first: step %d, %s).', n, step,
                  *bad)
  skipped += n
  if skipped > config.max_skipped_steps:
    raise divergence.DivergenceError(*bad, detail=(
        f' {skipped} steps skipped so far, more than config.max_skipped_steps='
        f'{config.max_skipped_steps}.'))
  return skipped


def _remove_if_empty(workdir: str) -> None:
  """Undoes the workdir's creation when a failed start left nothing in it."""
  for sub in ('checkpoints', ''):
    path = os.path.join(workdir, sub)
    try:
      if os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
    except OSError:
      pass


def load_results(workdir: str) -> dict | None:
  """The results.json of a finished run in `workdir`, or None.

  A damaged results.json (a kill during its write leaves a partial file only if written
  by something else than `write_json_atomic`) is moved aside with a warning, and the run
  is treated as unfinished: it resumes from its checkpoints.
  """
  path = os.path.join(workdir, RESULTS)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    moved = f'{path}.damaged-{time.strftime("%Y%m%d-%H%M%S")}'
    os.replace(path, moved)
    logging.warning('%s is damaged (%s); moved it to %s and resuming the run.', path, e, moved)
    return None


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
      eval_history=meta['eval'], train_loss=meta.get('train_loss', []),
      skipped_steps=meta.get('skipped_steps', 0),
      config_changes=meta.get('config_changes', []),
      damaged_checkpoints=meta.get('damaged_checkpoints', []), **task.results_info(),
      environment=dict(jax=jax.__version__, backend=jax.default_backend(),
                       device=jax.devices()[0].device_kind, num_devices=jax.device_count(),
                       cpu_count=os.cpu_count(), machine=platform.machine()))

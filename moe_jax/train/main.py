"""Entry point: train a config into a workdir (resuming if it holds a checkpoint).

    python -m moe_jax.train.main --config=configs/vit/fashion_mnist.py:soft_moe,tiny \
        --workdir=workdirs/fmnist_soft_tiny [--config.num_train_steps=2000 ...]

Exit status (for sweep runners and cluster schedulers; printed with its meaning):
  0   finished: results.json written (or the workdir already held the finished run)
  1   failed: an unexpected error (a bug: the traceback is printed)
  2   bad input: a config value, a flag, missing data or an unwritable workdir; nothing
      was created (the message names the field and what to change)
  3   diverged: a non-finite loss or gradient; the last checkpoint is the last good state
  4   no restorable checkpoint (every one damaged, or --strict_restore and the newest is)
  75  stopped by a signal (SIGTERM, Ctrl-C) or --stop_at_step, after a checkpoint:
      rerun the same command to resume (75 = EX_TEMPFAIL, "try again")

On 8 devices, experts split 4 ways (every host of a TPU pod / SLURM job runs the same
command; by hand, add --coordinator_address=HOST:PORT --num_processes=N --process_id=I):

    python -m moe_jax.train.main --config=configs/vit/fashion_mnist.py:soft_moe,tiny \
        --workdir=workdirs/fmnist_soft_tiny_8dev --config.mesh.data=2 --config.mesh.expert=4
"""
from __future__ import annotations

import logging as logging_std
import os

if __name__ == '__main__':
  # First thing: re-execute once under TCMalloc when installed (see moe_jax/allocator.py).
  from moe_jax import allocator as _allocator
  _allocator.use_fast_allocator()

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# TensorFlow only reads the data here; without this it prints a oneDNN notice at import.
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

import sys  # noqa: E402
import traceback  # noqa: E402

from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_NO_CHECKPOINT = 0, 1, 2, 3, 4
EXIT_STOPPED = 75

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, summaries and results.json.')
flags.DEFINE_integer('stop_at_step', None, 'Stop with a checkpoint after this step (resume later).')
flags.DEFINE_bool('strict_restore', False, 'Stop when the newest checkpoint is damaged instead of '
                  'falling back to the newest intact one.')
flags.DEFINE_bool('allow_config_change', False, 'Resume with a changed config (not a changed '
                  'model shape); the changes are recorded in results.json.')
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/vit/fashion_mnist.py:soft_moe,tiny',
                                lock_config=True)
flags.DEFINE_string('coordinator_address', None, 'Multi-host by hand: HOST:PORT of process 0 '
                    '(not needed on Cloud TPU VMs and under SLURM).')
flags.DEFINE_integer('num_processes', None, 'Multi-host by hand: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host by hand: this process, 0 .. num_processes-1.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietOrbax(logging_std.Filter):
  """Drops orbax's INFO chatter and the tracebacks its background threads log while a
  damaged checkpoint is read (the trainer reports the damage once, readably)."""

  def filter(self, record):
    if '/orbax/' not in record.pathname:
      return True
    return record.levelno >= logging_std.WARNING and not record.exc_info and (
        'Event loop is closed' not in record.getMessage())


def _fail(status: int, what: str, message: str) -> int:
  logging.flush()
  print(f'\nmoe_jax.train.main: {what} (exit status {status}): {message}', file=sys.stderr,
        flush=True)
  return status


def run(argv) -> int:
  """Trains FLAGS.config into FLAGS.workdir; returns the exit status (see the docstring)."""
  if len(argv) > 1:
    return _fail(EXIT_BAD_INPUT, 'bad input', f'too many command-line arguments: {argv[1:]}')
  from moe_jax import parallel
  from moe_jax.data.prepare import MissingDataError
  from moe_jax.errors import ConfigError
  from moe_jax.tasks import TASKS
  from moe_jax.train.checkpoint import CheckpointError
  from moe_jax.train.divergence import DivergenceError
  from moe_jax.train.trainer import train_and_evaluate
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)   # TPU pods, SLURM; no-op on one host
  try:
    import tensorflow as tf             # only tf.data / tfds / summaries use it
    tf.config.set_visible_devices([], 'GPU')
  except ImportError:
    pass
  logging.info('JAX process %d / %d, devices %s', jax.process_index(), jax.process_count(),
               jax.devices())
  from moe_jax import allocator
  logging.info('Memory allocator: %s', allocator.describe())
  try:
    results = train_and_evaluate(FLAGS.config, FLAGS.workdir, stop_at_step=FLAGS.stop_at_step,
                                 strict_restore=FLAGS.strict_restore,
                                 allow_config_change=FLAGS.allow_config_change)
  except (ConfigError, MissingDataError) as e:
    return _fail(EXIT_BAD_INPUT, 'bad input, nothing was trained', str(e))
  except DivergenceError as e:
    return _fail(EXIT_DIVERGED, 'diverged', str(e))
  except CheckpointError as e:
    return _fail(EXIT_NO_CHECKPOINT, 'no restorable checkpoint', str(e))
  except Exception as e:   # noqa: BLE001 - a bug: show where, then the cause once
    traceback.print_exc()
    return _fail(EXIT_FAILED, 'failed', f'{type(e).__name__}: {e}')
  if results is None:
    print(f'Stopped with a checkpoint in {FLAGS.workdir}; rerun the same command to resume '
          f'(exit status {EXIT_STOPPED}).', flush=True)
    return EXIT_STOPPED
  headline = TASKS[FLAGS.config.task.name].headline_text(results)
  print(f"{headline} after {results['steps']} steps, "
        f"{results['train_time_s']:.0f}s training ({results['wall_time_s']:.0f}s wall); "
        f"results in {os.path.join(FLAGS.workdir, 'results.json')}", flush=True)
  return EXIT_OK


def main(argv):
  logging.get_absl_handler().addFilter(_QuietOrbax())
  sys.exit(run(argv))


def parse_flags(argv):
  """absl's flag parsing, but a bad flag or config override exits with status 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(_fail(EXIT_BAD_INPUT, 'bad input, nothing was trained', str(e)))
  except (AttributeError, KeyError) as e:   # ml_collections: an override of a missing field
    from moe_jax.train import config_lib
    sys.exit(_fail(EXIT_BAD_INPUT, 'bad input, nothing was trained',
                   config_lib.unknown_override_message(argv) or f'a --config override: {e}'))


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main, flags_parser=parse_flags)

"""Entry point: train a config into a workdir (resuming if it holds a checkpoint).

    python -m moe_jax.train.main --config=configs/vit/fashion_mnist.py:soft_moe,tiny \
        --workdir=workdirs/fmnist_soft_tiny [--config.num_train_steps=2000 ...]

On 8 devices, experts split 4 ways (every host of a TPU pod / SLURM job runs the same
command; by hand, add --coordinator_address=HOST:PORT --num_processes=N --process_id=I):

    python -m moe_jax.train.main --config=configs/vit/fashion_mnist.py:soft_moe,tiny \
        --workdir=workdirs/fmnist_soft_tiny_8dev --config.mesh.data=2 --config.mesh.expert=4
"""
from __future__ import annotations

import logging as logging_std
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, summaries and results.json.')
flags.DEFINE_integer('stop_at_step', None, 'Stop with a checkpoint after this step (resume later).')
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/vit/fashion_mnist.py:soft_moe,tiny',
                                lock_config=True)
flags.DEFINE_string('coordinator_address', None, 'Multi-host by hand: HOST:PORT of process 0 '
                    '(not needed on Cloud TPU VMs and under SLURM).')
flags.DEFINE_integer('num_processes', None, 'Multi-host by hand: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host by hand: this process, 0 .. num_processes-1.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietOrbax(logging_std.Filter):
  """Drops orbax's per-save INFO chatter (warnings and errors still show)."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or '/orbax/' not in record.pathname


def main(argv):
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  from moe_jax import parallel
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)   # TPU pods, SLURM; no-op on one host
  try:
    import tensorflow as tf             # only tf.data / tfds / summaries use it
    tf.config.set_visible_devices([], 'GPU')
  except ImportError:
    pass
  logging.info('JAX process %d / %d, devices %s', jax.process_index(), jax.process_count(),
               jax.devices())
  from moe_jax.tasks import TASKS
  from moe_jax.train.trainer import train_and_evaluate
  results = train_and_evaluate(FLAGS.config, FLAGS.workdir, stop_at_step=FLAGS.stop_at_step)
  if results is not None:
    headline = TASKS[FLAGS.config.task.name].headline_text(results)
    print(f"{headline} after {results['steps']} steps, "
          f"{results['train_time_s']:.0f}s training ({results['wall_time_s']:.0f}s wall); "
          f"results in {os.path.join(FLAGS.workdir, 'results.json')}")


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main)

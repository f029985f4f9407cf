r"""Sparse upcycling: write the initial checkpoint of an MoE run from a trained dense run.

    python -m moe_jax.train.main --config=configs/vit/fashion_mnist.py:dense,tiny --workdir=A
    python scripts/upcycle.py --dense_workdir=A \
        --config=configs/vit/fashion_mnist.py:tokens_choice,tiny --workdir=B
    python -m moe_jax.train.main --config=configs/vit/fashion_mnist.py:tokens_choice,tiny --workdir=B

Every expert of B's MoE blocks is a copy of A's dense MLP, the router is fresh, the
optimizer state is fresh; everything else is A's (see `moe_jax.train.upcycle`). B then
trains from this step-0 checkpoint with the same config (the same `--config...` flags).
The trainer does the same in one go with `--config.init_from.dense_workdir=A`.
"""
from __future__ import annotations

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import app, flags, logging  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from moe_jax.train import config_lib, upcycle  # noqa: E402
from moe_jax.train.builders import build_model, build_optimizer  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('dense_workdir', None, 'Workdir of the trained dense run (router=dense).')
flags.DEFINE_string('workdir', None, 'New workdir of the MoE run (must hold no checkpoint).')
config_flags.DEFINE_config_file('config', None, 'The MoE run\'s config, e.g. '
                                'configs/vit/fashion_mnist.py:tokens_choice,tiny', lock_config=False)
flags.mark_flags_as_required(['dense_workdir', 'workdir', 'config'])


def upcycle_to_workdir(config, dense_workdir: str, workdir: str) -> None:
  """Builds `config`'s model and optimizer, upcycles `dense_workdir` into it, saves step 0."""
  config = config.copy_and_resolve_references()
  config.init_from.dense_workdir = dense_workdir
  config_lib.validate(config)
  model = build_model(config, rngs=nnx.Rngs(config.seed))
  optimizer = nnx.Optimizer(model, build_optimizer(config)[0], wrt=nnx.Param)
  state = upcycle.upcycle_train_state(config, nnx.state((model, optimizer)))
  upcycle.write_initial_checkpoint(config, state, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  upcycle_to_workdir(FLAGS.config, FLAGS.dense_workdir, FLAGS.workdir)
  logging.info('Wrote the upcycled step-0 checkpoint of %s.', FLAGS.workdir)
  print(f'Upcycled {FLAGS.dense_workdir} into {FLAGS.workdir}; train it with the same --config.')


if __name__ == '__main__':
  app.run(main)

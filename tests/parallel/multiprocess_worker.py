"""One process of a 2-process × 4-CPU-device job: a small MoE model, then the ViT trainer.

    python tests/parallel/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR

(XLA_FLAGS=--xla_force_host_platform_device_count=4 set by the launcher.) Each process
feeds its half of the global batch; the mesh (data=2, expert=4) spans both processes.
Afterwards process 0 trains the same model on the whole batch on one local device (no
mesh) as the reference. Then both processes run the ViT trainer (`train_and_evaluate`,
tokens choice, mesh data=2 × expert=4, mock data, checkpoints in the shared WORKDIR).
Prints one JSON line with the loss curves.
"""
import json
import sys

from moe_jax import parallel

PID, NPROC, PORT = (int(a) for a in sys.argv[1:4])
WORKDIR = sys.argv[4]
assert parallel.initialize_distributed(f'127.0.0.1:{PORT}', NPROC, PID) == (NPROC > 1)

import jax                      # noqa: E402  (after initialize, as jax requires)
import jax.numpy as jnp         # noqa: E402
import numpy as np              # noqa: E402
import optax                    # noqa: E402
from flax import nnx            # noqa: E402

from moe_jax import layers     # noqa: E402

STEPS, BATCH, SEQ, D = 3, 16, 4, 8


class TinyMoe(nnx.Module):
  def __init__(self, rngs):
    self.inp = nnx.Linear(3, D, rngs=rngs)
    self.moe = layers.MoeLayer(D, 8, 16, router='tokens_choice',
                               router_kwargs=dict(k=2, capacity_factor=1.0), rngs=rngs)
    self.out = nnx.Linear(D, 1, rngs=rngs)

  def __call__(self, x):
    h = self.inp(x)
    y, aux = self.moe(h)
    return self.out(h + y)[..., 0], sum(aux['losses'].values())


def loss_fn(model, x, t):
  pred, aux = model(x)
  return jnp.mean((pred - t) ** 2) + aux


@nnx.jit
def train_step(model, optimizer, x, t):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, t)
  optimizer.update(model, grads)
  return loss


def train(mesh):
  rng = np.random.default_rng(0)                       # same global batch everywhere
  x = rng.normal(size=(BATCH, SEQ, 3)).astype(np.float32)
  t = np.sin(x.sum(-1)).astype(np.float32)
  model = TinyMoe(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  if mesh is not None:
    parallel.shard_module(model, mesh)
    parallel.shard_module(optimizer, mesh)
    local = slice(PID * BATCH // NPROC, (PID + 1) * BATCH // NPROC)   # this host's examples
    x, t = parallel.shard_batch((x[local], t[local]), mesh)
    assert model.moe.experts.w_in[...].sharding.spec[0] == 'expert'
  return [float(train_step(model, optimizer, x, t)) for _ in range(STEPS)]


mesh = parallel.make_mesh(dict(data=2, expert=4))
assert jax.device_count() == 8 and jax.local_device_count() == 8 // NPROC
with jax.set_mesh(mesh):
  sharded = train(mesh)
single = None
if PID == 0:   # a purely local computation: only one process needs the reference
  with jax.default_device(jax.local_devices()[0]):
    single = train(None)

# The trainer, as `python -m moe_jax.train.main ... --config.mesh.data=2 --config.mesh.expert=4`
# runs on every host: each process feeds its rows of every batch.
from moe_jax.train.trainer import train_and_evaluate               # noqa: E402
from scripts.compare_mesh_losses import losses, tiny_config         # noqa: E402
from tests.train.vit_helpers import mock_fashion_mnist             # noqa: E402
with mock_fashion_mnist():
  res = train_and_evaluate(tiny_config('tokens_choice', 3, (2, 4)), WORKDIR)
trainer = dict(train_loss=losses(res), test_loss=res['final']['test_loss'],
               test_accuracy=res['final']['test_accuracy'])
print('RESULT:' + json.dumps(dict(process=PID, sharded=sharded, single=single, trainer=trainer)),
      flush=True)
jax.distributed.shutdown() if NPROC > 1 else None

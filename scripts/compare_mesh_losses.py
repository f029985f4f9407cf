r"""Training losses of the ViT trainer on one device vs a device mesh, same config -> JSON.

    python scripts/compare_mesh_losses.py --out=experiments/results/mesh_losses.json

trains a tiny ViT (patch 14, width 16, depth 2, the last block MoE with 4 experts, batch
16) for --steps steps with each router, once on one device and once on the mesh
(default data=2 x expert=4), through `train_and_evaluate` with `config.mesh`, and
writes both loss curves and their largest difference per router. Without XLA_FLAGS it
simulates 8 CPU devices. Data: the local Fashion-MNIST (prepared for TFDS on first
use); `tests/parallel/checks_trainer.py` runs the same comparison on mock data.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

if 'jax' not in sys.modules:
  os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUTERS = ('tokens_choice', 'experts_choice', 'soft_moe')


def tiny_config(router: str, steps: int, mesh=(1, 1), **overrides):
  """configs/vit/fashion_mnist.py shrunk to seconds per compile (4 tokens per image)."""
  from moe_jax.train import config_lib
  module = config_lib.load_config_module(os.path.join(ROOT, 'configs', 'vit', 'fashion_mnist.py'))
  c = module.get_config(f'{router},tiny')
  c.model.update(patch_size=14, width=16, depth=2, mlp_dim=32, num_heads=2)
  c.model.moe.update(last_n=1, num_experts=4)
  c.update(num_train_steps=steps, batch_size=16, eval_batch_size=16, log_every_steps=1,
           eval_every_steps=steps, checkpoint_every_steps=steps, count_flops=False)
  c.optimizer.warmup_steps = 1
  c.mesh.data, c.mesh.expert = mesh
  return config_lib.apply_overrides(c, overrides)


def losses(results: dict) -> list[float]:
  return [loss for _, loss in results['train_loss']]


def compare(routers, steps: int, mesh=(2, 4), workroot: str | None = None, **overrides) -> dict:
  """{router: {'one_device': [...], 'mesh': [...], 'max_abs_diff': float}} (+ eval losses)."""
  from moe_jax.train.trainer import train_and_evaluate
  out = {}
  with tempfile.TemporaryDirectory(dir=workroot) as tmp:
    for router in routers:
      runs = {}
      for name, m in (('one_device', (1, 1)), ('mesh', mesh)):
        config = tiny_config(router, steps, m, **overrides)
        runs[name] = train_and_evaluate(config, os.path.join(tmp, f'{router}_{name}'))
      a, b = losses(runs['one_device']), losses(runs['mesh'])
      out[router] = dict(one_device=a, mesh=b,
                         max_abs_diff=max(abs(x - y) for x, y in zip(a, b)),
                         eval_loss=dict(one_device=runs['one_device']['final']['test_loss'],
                                        mesh=runs['mesh']['final']['test_loss']))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--routers', default=','.join(ROUTERS))
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--mesh', default='2,4', help='data,expert')
  parser.add_argument('--out', default=None, help='JSON file (default: print only)')
  args = parser.parse_args()
  import jax
  mesh = tuple(int(s) for s in args.mesh.split(','))
  # Real data: a 4096-image training subset, the first 512 test images for evaluation.
  res = compare(args.routers.split(','), args.steps, mesh, **{
      'data.train_split': 'train[:4096]', 'data.eval_split': 'test[:512]', 'eval_batch_size': 128})
  report = dict(mesh=dict(data=mesh[0], expert=mesh[1]), steps=args.steps,
                devices=jax.device_count(), backend=jax.default_backend(), jax=jax.__version__,
                command='python ' + ' '.join(sys.argv), routers=res)
  for router, r in res.items():
    print(f"{router:15s} max |loss(1 device) - loss(mesh)| = {r['max_abs_diff']:.2e}  "
          f"final train loss {r['one_device'][-1]:.6f} vs {r['mesh'][-1]:.6f}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump(report, f, indent=1)
    print('wrote', args.out)


if __name__ == '__main__':
  sys.path.insert(0, ROOT)
  main()

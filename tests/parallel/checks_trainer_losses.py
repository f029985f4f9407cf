"""The ViT trainer on mesh (data=2, expert=4) vs one device: same losses (1e-4).

Run by test_trainer_mesh.py in a subprocess with 8 simulated CPU devices. The same
comparison on the real Fashion-MNIST: `python scripts/compare_mesh_losses.py`.
"""
import jax

from scripts.compare_mesh_losses import ROUTERS, compare
from tests.parallel._harness import run_checks
from tests.train.vit_helpers import mock_fashion_mnist

STEPS = 4   # warmup 1: step 1 updates at learning rate 0; losses 3, 4 follow 1, 2 real updates


def _check(router):
  assert jax.device_count() == 8
  with mock_fashion_mnist():
    r = compare([router], STEPS, mesh=(2, 4))[router]
  print(f'{router}: 1 device {r["one_device"]}  mesh(2,4) {r["mesh"]}  '
        f'max diff {r["max_abs_diff"]:.2e}', flush=True)
  assert len(r['one_device']) == len(r['mesh']) == STEPS
  assert r['max_abs_diff'] <= 1e-4, r
  assert abs(r['eval_loss']['one_device'] - r['eval_loss']['mesh']) <= 1e-4, r['eval_loss']


def check_tokens_choice():
  _check('tokens_choice')


def check_experts_choice():
  _check('experts_choice')


def check_soft_moe():
  _check('soft_moe')


assert tuple(n[len('check_'):] for n in list(globals()) if n.startswith('check_')) == ROUTERS

if __name__ == '__main__':
  run_checks(dict(globals()))

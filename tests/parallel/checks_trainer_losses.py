"""The trainer on mesh (data=2, expert=4) vs one device: same losses (1e-4), for the ViT
(three routers) and the language models (span corruption and causal LM).

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


def _lm_check(objective, router):
  import tempfile
  from moe_jax.train.trainer import train_and_evaluate
  from tests.train.lm_helpers import mock_text, tiny_lm_config
  tmp = tempfile.mkdtemp()
  out = {}
  with mock_text():
    for mesh in ((1, 1), (2, 4)):
      c = tiny_lm_config(objective, router, f'{tmp}/tfds', num_train_steps=STEPS, batch_size=8,
                         eval_batch_size=8, eval_every_steps=STEPS,
                         **{'optimizer.warmup_steps': 1})
      c.mesh.data, c.mesh.expert = mesh
      for moe in ('encoder_moe', 'decoder_moe', 'moe'):
        if moe in c.model and c.model[moe].router == 'switch':
          # Input jitter draws per-device noise under a mesh (by design): turn it off (T5X).
          c.model[moe].router_kwargs.jitter_eps = 0.0
      res = train_and_evaluate(c, f'{tmp}/{mesh[0]}x{mesh[1]}')
      out[mesh] = ([loss for _, loss in res['train_loss']], res['final']['validation_loss'])
  (one, one_eval), (mesh, mesh_eval) = out[(1, 1)], out[(2, 4)]
  print(f'{objective}/{router}: 1 device {one}  mesh(2,4) {mesh}', flush=True)
  assert len(one) == len(mesh) == STEPS
  assert max(abs(a - b) for a, b in zip(one, mesh)) <= 1e-4, (one, mesh)
  assert abs(one_eval - mesh_eval) <= 1e-4, (one_eval, mesh_eval)


def check_lm_span_corruption_switch():
  _lm_check('span_corruption', 'switch')


def check_lm_causal_tokens_choice():
  _lm_check('causal_lm', 'tokens_choice')


VIT = tuple(n[len('check_'):] for n in list(globals())
            if n.startswith('check_') and not n.startswith('check_lm_'))
assert VIT == ROUTERS

if __name__ == '__main__':
  run_checks(dict(globals()))

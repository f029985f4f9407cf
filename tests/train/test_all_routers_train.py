"""Smoke test: every router in `ROUTERS` trains for a few steps in the ViT trainer.

One process, tiny shapes (28x28 images, patch 14 -> 4 tokens, width 16, 2 blocks, MoE in
the last one, 4 experts, batch 8, 2 steps); XLA compilation of each router's train
and eval steps dominates the time.
"""
import math

import pytest

from moe_jax.layers import ROUTERS
from moe_jax.train import config_lib, writers
from moe_jax.train.trainer import train_and_evaluate
from tests.train.vit_helpers import mock_fashion_mnist, tiny_config

# Small-E settings where a router's paper default does not fit 4 experts.
ROUTER_KWARGS = {
    'tokens_choice': config_lib.ROUTER_KWARGS['tokens_choice'],
    'experts_choice': config_lib.ROUTER_KWARGS['experts_choice'],
    'soft_moe': config_lib.ROUTER_KWARGS['soft_moe'],
    'deepseek': dict(k=2),                # V3 routes 8 of 256
}


def _config(router):
  c = tiny_config('tokens_choice,tiny', num_train_steps=2, eval_every_steps=2,
                  checkpoint_every_steps=2, eval_batch_size=32,
                  **{'model.patch_size': 14, 'optimizer.warmup_steps': 1})
  config_lib.set_router(c.model.moe, router, **ROUTER_KWARGS.get(router, {}))
  return c


@pytest.mark.slow
def test_every_router_trains_in_the_vit_trainer(tmp_path):
  failures = {}
  with mock_fashion_mnist(n=32):
    for name in sorted(ROUTERS):
      workdir = str(tmp_path / name)
      try:
        res = train_and_evaluate(_config(name), workdir)
      except Exception as e:   # collect all failures, then report them together
        failures[name] = f'{type(e).__name__}: {e}'
        continue
      losses = [r['train/loss'] for r in writers.read_jsonl(workdir) if 'train/loss' in r]
      ok = (len(losses) == 2 and all(math.isfinite(v) for v in losses)
            and 0.0 <= res['final']['test_accuracy'] <= 1.0
            and math.isfinite(res['final']['test_loss'])
            and res['params']['total'] >= res['params']['active'] > 0)
      if not ok:
        failures[name] = f'losses {losses}, final {res["final"]}, params {res["params"]}'
  assert not failures, failures

"""'noisy_top_k' and 'gshard_top2' modules: zero init, noise and random dispatch only in
training, evaluation capacity and policy, option errors (no compilation needed)."""
import jax
import numpy as np
import pytest
from flax import nnx

from moe_jax.layers.routers.gshard import GShardTop2Router
from moe_jax.layers.routers.noisy_top_k import NoisyTopKRouter


def rngs():
  # 'rbg' keys: random bits compile far faster on CPU than the default threefry.
  return nnx.Rngs(jax.random.key(0, impl='rbg'))


def test_noisy_top_k_zero_init_and_noise_only_in_training():
  router = NoisyTopKRouter(8, 6, rngs=rngs())
  assert router.k == 4
  assert not np.any(np.asarray(router.w_gate[...])) and not np.any(np.asarray(router.w_noise[...]))
  x = np.ones((2, 10, 8), np.float32)
  router.eval()
  count = int(router.rngs.count[...])
  r = jax.eval_shape(router, x)
  assert int(router.rngs.count[...]) == count and r.capacity == 10   # no noise; C = S
  assert NoisyTopKRouter(8, 6, rngs=rngs(), noisy=False).w_noise is None
  with pytest.raises(ValueError, match='k=7'):
    NoisyTopKRouter(8, 6, rngs=rngs(), k=7)


def test_gshard_eval_is_deterministic_and_capacity_is_2s_over_e():
  router = GShardTop2Router(8, 4, rngs=rngs())
  x = np.ones((2, 10, 8), np.float32)
  router.eval()
  count = int(router.rngs.count[...])
  assert jax.eval_shape(router, x).capacity == 5                    # 2 · 10 / 4
  assert int(router.rngs.count[...]) == count                       # 'all' at eval: no draws
  with pytest.raises(ValueError, match='eval_second_policy'):
    GShardTop2Router(8, 4, rngs=rngs(), eval_second_policy='sample')
  with pytest.raises(ValueError, match='renormalize'):
    GShardTop2Router(8, 4, rngs=rngs(), renormalize='never')
  with pytest.raises(ValueError, match='num_experts >= 2'):
    GShardTop2Router(8, 1, rngs=rngs())

"""What a trainer calls for any model: `score_function_loss`, `after_step` (on every router
of the model) and `recording_moe_calls` (FLOP accounting)."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax import layers
from tests.layers._rbg import rngs

B, S, D, E, H = 2, 4, 8, 4, 16


class ThreeLayers(nnx.Module):
  """REINFORCE, DeepSeek (groups of 4 tokens) and hash routers in a row."""

  def __init__(self, rngs):
    self.first = layers.MoeLayer(D, E, H, router='reinforce', router_kwargs=dict(k=1), rngs=rngs)
    self.second = layers.MoeLayer(D, E, H, router='deepseek', group_size=4, rngs=rngs,
                                  router_kwargs=dict(k=2, bias_update_rate=0.1))
    self.third = layers.MoeLayer(D, E, H, router='hash', rngs=rngs)

  def __call__(self, x, ids):
    aux = {}
    for name in ('first', 'second', 'third'):
      layer = getattr(self, name)
      x, aux[name] = layer(x, token_ids=ids if layer.router.needs_token_ids else None)
    return x, aux


def inputs():
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32),
          jnp.asarray(rng.integers(0, 30, size=(B, S)), jnp.int32))


def test_recording_moe_calls_lists_every_call_while_active():
  model = ThreeLayers(rngs(0))
  x, ids = inputs()
  with layers.recording_moe_calls() as outer:
    with layers.recording_moe_calls() as calls:
      nnx.eval_shape(lambda m, x, i: m(x, i), model, x, ids)
  assert len(outer) == len(calls) == 3
  assert [c.layer.router_name for c in calls] == ['reinforce', 'deepseek', 'hash']
  assert [c.x_shape for c in calls] == [(B, S, D)] * 3
  assert [c.has_token_ids for c in calls] == [False, False, True]
  layer, shape, has_ids = calls[1]                  # a tuple, as the contract promises
  assert layer.group_size == 4 and layer.engine_name == 'gather'
  nnx.eval_shape(lambda m, x, i: m(x, i), model, x, ids)
  assert len(calls) == 3                            # nothing recorded after the block


def test_score_function_loss_and_after_step_on_every_router():
  model = ThreeLayers(rngs(0))
  x, ids = inputs()
  rewards = jnp.asarray([-0.5, 1.5], jnp.float32)
  model.first.router.baseline[...] = jnp.float32(0.25)

  @nnx.jit
  def forward(model, x, ids):
    _, aux = model(x, ids)
    return aux, layers.score_function_loss(aux, rewards)

  aux, surrogate = forward(model, x, ids)
  # Only the REINFORCE layer has a surrogate: -mean_{b,t} (r_b - baseline) log π(e_bt).
  log_prob = np.asarray(aux['first']['metrics']['reinforce_log_prob'], np.float64).reshape(B, -1)
  want = -np.mean((np.asarray(rewards, np.float64)[:, None] - 0.25) * log_prob)
  np.testing.assert_allclose(float(surrogate), want, rtol=1e-6)
  assert float(layers.score_function_loss({'second': aux['second']}, rewards)) == 0.0

  # The forward only counted DeepSeek's tokens; the hook applies the bias update.
  counts = np.asarray(model.second.router.expert_counts[...], np.float64)
  assert counts.sum() == B * S * 2
  np.testing.assert_array_equal(np.asarray(model.second.router.expert_bias[...]), 0.0)
  assert nnx.jit(lambda m, r: layers.after_step(m, r))(model, rewards) == 3
  np.testing.assert_allclose(np.asarray(model.second.router.expert_bias[...]),
                             0.1 * np.sign(counts.mean() - counts), atol=1e-7)
  np.testing.assert_array_equal(np.asarray(model.second.router.expert_counts[...]), 0.0)
  # First baseline update: b = mean reward (the moving average starts from it).
  np.testing.assert_allclose(float(model.first.router.baseline[...]), 0.5, rtol=1e-6)
  assert int(model.first.router.baseline_count[...]) == 1

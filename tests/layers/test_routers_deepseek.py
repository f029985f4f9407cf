"""'deepseek' module: the expert bias is non-trainable state updated once per training
step, by `layers.after_step`, from the batch's counts; shared experts in MoeLayer;
fine-grained helper."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moe_jax import layers
from moe_jax.layers.routers.deepseek import DeepSeekRouter, ExpertBias, fine_grained


def rngs():
  # 'rbg' keys: random bits compile far faster on CPU than the default threefry.
  return nnx.Rngs(jax.random.key(0, impl='rbg'))

D, E, H, K = 8, 4, 16, 2


def make(**extra):
  return layers.MoeLayer(D, E, H, router='deepseek', router_kwargs=dict(k=K), engine='gather',
                         rngs=rngs(), **extra)


def test_bias_is_state_updated_once_per_step_and_never_by_the_optimizer():
  layer = make()
  layer.router.expert_bias[...] = jnp.asarray([0.3, -0.1, 0.0, 0.05])   # a non-trivial b
  x = np.random.default_rng(0).normal(size=(3, 8, D)).astype(np.float32)
  optimizer = nnx.Optimizer(layer, optax.sgd(0.5), wrt=nnx.Param)
  assert isinstance(layer.router.expert_bias, ExpertBias)
  assert not isinstance(layer.router.expert_bias, nnx.Param)
  assert 'expert_bias' not in nnx.state(layer, nnx.Param)['router']

  # Reference selection from the weights before the step (V3: top-k of sigmoid(x·W) + b).
  w = np.asarray(layer.router.gate.kernel[...], np.float64)
  b = np.asarray(layer.router.expert_bias[...], np.float64)
  s = 1 / (1 + np.exp(-(x.reshape(-1, D) @ w)))
  chosen = np.argsort(-(s + b), -1)[:, :K]
  counts = np.bincount(chosen.ravel(), minlength=E)
  expected = b + 1e-3 * np.sign(counts.mean() - counts)

  @nnx.jit
  def train_step(layer, optimizer, x):
    def loss(m):
      y, aux = m(x)
      return jnp.sum(y ** 2) + sum(aux['losses'].values())
    value, grads = nnx.value_and_grad(loss)(layer)
    optimizer.update(layer, grads)
    bias_before_hook = layer.router.expert_bias[...]
    layers.after_step(layer, None)
    return bias_before_hook

  kernel_before = np.asarray(layer.router.gate.kernel[...])
  bias_before_hook = train_step(layer, optimizer, x)
  np.testing.assert_array_equal(np.asarray(bias_before_hook), b)   # the forward only counts
  np.testing.assert_allclose(np.asarray(layer.router.expert_bias[...]), expected, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(layer.router.expert_counts[...]), 0.0)   # consumed
  assert not np.allclose(np.asarray(layer.router.gate.kernel[...]), kernel_before)   # SGD ran
  # Counts of several training calls add up; the hook applies one update from their sum.
  nnx.jit(lambda m, x: m(x))(layer, x)
  nnx.jit(lambda m, x: m(x))(layer, x[:1])
  np.testing.assert_array_equal(np.asarray(layer.router.expert_counts[...]).sum(), 4 * 8 * K)
  layer.eval()
  after_step = np.asarray(layer.router.expert_bias[...])
  counts = np.asarray(layer.router.expert_counts[...])
  jax.eval_shape(layer, x)          # evaluation: no state update (it would fail under tracing)
  np.testing.assert_array_equal(np.asarray(layer.router.expert_bias[...]), after_step)
  np.testing.assert_array_equal(np.asarray(layer.router.expert_counts[...]), counts)


def test_shared_experts_are_added_unweighted():
  x = np.random.default_rng(1).normal(size=(2, 8, D)).astype(np.float32)
  with_shared, plain = make(num_shared_experts=2, shared_expert_hidden=12), make()
  with_shared.eval()
  plain.eval()
  y_shared, y_plain = nnx.jit(lambda a, b, x: (a(x)[0], b(x)[0]))(with_shared, plain, x)
  # Same seed: routers and routed experts are identical; the difference is the shared part.
  sh = with_shared.shared_experts
  assert sh.w_in[...].shape == (2, D, 12)
  xs = x.reshape(-1, D).astype(np.float64)
  ref = 0
  for i in range(2):
    hid = xs @ np.asarray(sh.w_in[...][i], np.float64) + np.asarray(sh.b_in[...][i])
    act = np.asarray(jax.nn.gelu(hid))
    ref = ref + act @ np.asarray(sh.w_out[...][i], np.float64) + np.asarray(sh.b_out[...][i])
  np.testing.assert_allclose(np.asarray(y_shared - y_plain).reshape(-1, D), ref, atol=1e-4)
  with pytest.raises(ValueError, match='num_shared_experts'):
    make(num_shared_experts=-1)


def test_fine_grained_and_construction_errors():
  assert fine_grained(8, 512, 2, m=4) == dict(num_experts=32, expert_hidden=128,
                                              router_kwargs=dict(k=8))
  with pytest.raises(ValueError, match='divide'):
    fine_grained(8, 100, 2, m=3)
  with pytest.raises(ValueError, match='k=8'):
    DeepSeekRouter(D, 4, rngs=rngs())                       # V3's k=8 > 4 experts
  with pytest.raises(ValueError, match='raise topk_groups'):
    DeepSeekRouter(D, 8, rngs=rngs(), k=4, n_groups=4, topk_groups=1)
  with pytest.raises(ValueError, match='score_func'):
    DeepSeekRouter(D, 8, rngs=rngs(), k=2, score_func='tanh')

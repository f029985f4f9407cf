"""REINFORCE routing wired through the ViT train step: the router's gradient is the
score-function estimate (checked against a numpy formula), and the baseline moves."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe_jax.models import ViT
from moe_jax.models.vit import extract_patches
from moe_jax.train import steps
from tests.train.vit_helpers import image_task

LR = 0.5


def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _router_input(model, images):
  """The input of block 1's router, recomputed from the ViT's pieces: [B, S, d]."""
  x = model.embed(extract_patches(images, model.patch_size)) + model.posemb[...]
  x, _ = model.blocks[0](x, model.default_token_ids(images))
  blk = model.blocks[1]
  return blk.norm2(x + blk.attn(blk.norm1(x)))


def test_train_step_applies_the_reinforce_gradient_and_moves_the_baseline():
  # gate='one' and no balancing loss: the router's kernel can learn only through the
  # REINFORCE surrogate, so its SGD update is exactly -lr · the score-function gradient.
  model = ViT(num_classes=10, image_size=28, channels=1, patch_size=14, width=16, depth=2,
              mlp_dim=32, num_heads=2, rngs=nnx.Rngs(0),
              moe=dict(router='reinforce', num_experts=4, last_n=1,
                       router_kwargs=dict(gate='one', load_balance_weight=0.0, capacity_factor=4.0)))
  optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)
  train_step = steps.make_train_step(model, optimizer, lambda step: LR, image_task(), donate=False)
  images = jax.random.normal(jax.random.key(1), (8, 28, 28, 1))
  labels = jnp.arange(8) % 10
  router = model.blocks[1].mlp.router
  w0 = np.asarray(router.gate.kernel[...], np.float64)

  # The step's own draws: clones hold the same RNG counters, so they sample the same experts.
  h = _router_input(nnx.clone(model), images)
  expert = np.asarray(nnx.clone(model).blocks[1].mlp.router(h).token_expert[..., 0])   # [B, S]
  logits, _ = nnx.clone(model)(images)
  ce = -np.log(_np_softmax(np.asarray(logits, np.float64)))[np.arange(8), np.asarray(labels)]
  reward = -ce                                                   # [B]; baseline 0 at step 1
  h = np.asarray(h, np.float64)
  pi = _np_softmax(h @ w0)                                       # [B, S, E]
  score = np.eye(4)[expert] - pi                                 # ∇_logits log π(e)
  # d/dW of -mean_{b,t} (r_b - 0) log π(e_bt | h_bt)
  grad = -np.einsum('b,bsd,bse->de', reward, h, score) / expert.size

  state, metrics = train_step(nnx.state((model, optimizer)), {'image': images, 'label': labels})
  nnx.update((model, optimizer), state)
  w1 = np.asarray(router.gate.kernel[...], np.float64)
  assert np.abs(w1 - w0).max() > 1e-4                            # it did learn
  np.testing.assert_allclose(w1, w0 - LR * grad, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(metrics['reinforce_loss']),
                             -np.mean(reward[:, None] * np.log(pi[np.arange(8)[:, None],
                                                                  np.arange(4)[None], expert])),
                             rtol=1e-4)
  # First update sets b = mean reward; the next moves it by (1 - 0.99)(mean - b).
  np.testing.assert_allclose(float(router.baseline[...]), reward.mean(), rtol=1e-5)
  assert int(router.baseline_count[...]) == 1
  b1 = float(router.baseline[...])
  state, metrics = train_step(state, {'image': images, 'label': labels})
  nnx.update((model, optimizer), state)
  mean2 = -float(metrics['task_loss'])
  np.testing.assert_allclose(float(router.baseline[...]), 0.99 * b1 + 0.01 * mean2, rtol=1e-5)
  assert int(router.baseline_count[...]) == 2


def test_loss_terms_add_the_surrogate_only_for_reinforce_layers():
  rng = np.random.default_rng(0)
  logits, labels = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32), jnp.array([0, 4, 2])
  log_prob = jnp.asarray(np.log(rng.uniform(0.1, 1.0, size=(3, 2))), jnp.float32)
  aux = {'block_01': {'losses': {}, 'metrics': {'reinforce_log_prob': log_prob,
                                                 'reinforce_baseline': jnp.float32(-1.5)}},
         'block_02': {'losses': {'lb': jnp.float32(0.25)}, 'metrics': {}}}
  task_loss, per_example, _ = image_task().loss(logits, {'label': labels})
  total, terms = steps.loss_terms(task_loss, per_example, aux)
  ce = -np.log(_np_softmax(np.asarray(logits, np.float64)))[np.arange(3), np.asarray(labels)]
  surrogate = -np.mean((-ce[:, None] + 1.5) * np.asarray(log_prob))
  np.testing.assert_allclose(terms['reinforce_loss'], surrogate, rtol=1e-5)
  np.testing.assert_allclose(total, ce.mean() + 0.25 + surrogate, rtol=1e-5)
  _, plain = steps.loss_terms(task_loss, per_example, {'block_02': aux['block_02']})
  assert float(plain['reinforce_loss']) == 0.0

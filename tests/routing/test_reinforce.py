"""REINFORCE routing: log-probabilities, the score-function gradient against numpy, the
baseline, the sampling distribution, and a bandit the router must solve."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import layers
from moe_jax.layers.routers.reinforce import ReinforceRouter
from moe_jax.routing import reinforce as rl
from tests.layers._rbg import rngs


def np_softmax(x):
  x = np.exp(x - x.max(-1, keepdims=True))
  return x / x.sum(-1, keepdims=True)


def np_plackett_luce(probs, choices):
  """log P of drawing `choices` in order without replacement from `probs`."""
  logp, left = 0.0, 1.0
  for a in choices:
    logp += np.log(probs[a] / left)
    left -= probs[a]
  return logp


def np_grad_log_pl(probs, choices):
  """∇_logits log P: Σ_i onehot(a_i) - π restricted to the experts not drawn before i."""
  grad, alive = np.zeros_like(probs), np.ones_like(probs, bool)
  for a in choices:
    p = np.where(alive, probs, 0.0)
    grad += np.eye(len(probs))[a] - p / p.sum()
    alive[a] = False
  return grad


def test_sample_log_prob_is_plackett_luce():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 6))
  choices = np.stack([rng.permutation(6)[:3] for _ in range(3)])
  got = rl.sample_log_prob(jax.nn.log_softmax(jnp.array(logits)), jnp.array(choices))
  probs = np_softmax(logits)
  np.testing.assert_allclose(got, [np_plackett_luce(probs[i], choices[i]) for i in range(3)],
                             rtol=1e-5)


def test_surrogate_gradient_is_the_score_function_estimate():
  g, s, e = 2, 5, 4
  rng = np.random.default_rng(0)
  logits = jnp.array(rng.normal(size=(g, s, e)), jnp.float32)
  rewards = jnp.array(rng.normal(size=(g, s)), jnp.float32)
  key = jax.random.key(3)

  @jax.jit
  def grads_and_choices(logits):
    """For k = 1 (RL-R) and k = 2 (Plackett-Luce), d surrogate / d logits and the draws."""
    out = []
    for k in (1, 2):
      def surrogate(lg, k=k):
        r = rl.reinforce_routing(lg, key, k=k)
        return rl.reinforce_surrogate(r.metrics[rl.LOG_PROB_KEY], rewards, 0.25), r.token_expert
      out.append(jax.grad(surrogate, has_aux=True)(logits))
    return out

  probs = np_softmax(np.array(logits, np.float64))
  adv = np.array(rewards) - 0.25
  for k, (grad, choices) in zip((1, 2), grads_and_choices(logits)):
    choices = np.array(choices)
    expected = np.zeros((g, s, e))
    for i in range(g):
      for t in range(s):
        expected[i, t] = -adv[i, t] * np_grad_log_pl(probs[i, t], choices[i, t]) / (g * s)
    np.testing.assert_allclose(grad, expected, atol=1e-6)
    assert all(len(set(c)) == k for c in choices.reshape(-1, k))


def test_surrogate_broadcasts_per_example_rewards_and_masks():
  log_probs = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, -4.0]])
  rewards, mask = jnp.array([1.0, -1.0]), jnp.array([[1, 1, 0], [1, 0, 0]], jnp.float32)
  got = rl.reinforce_surrogate(log_probs, rewards, 0.5, mask=mask)
  expected = -((0.5 * -1 + 0.5 * -2) + (-1.5 * -0.5)) / 3
  assert float(got) == pytest.approx(expected)
  assert float(rl.reinforce_surrogate(log_probs, rewards, 0.5)) == pytest.approx(
      -np.mean(np.array([[0.5], [-1.5]]) * np.array(log_probs)))


def test_baseline_is_an_exponential_moving_average():
  b, n = jnp.zeros(()), jnp.zeros((), jnp.int32)
  ref = None
  for step, mean in enumerate([2.0, 4.0, -1.0]):
    rewards = jnp.array([mean - 1.0, mean + 1.0])
    b, n = rl.update_baseline(b, n, rewards, decay=0.9)
    ref = mean if ref is None else 0.9 * ref + 0.1 * mean
    assert float(b) == pytest.approx(ref, rel=1e-6) and int(n) == step + 1


def test_sampling_follows_the_policy_and_eval_takes_the_argmax():
  row = np.array([1.0, 0.0, -1.0, 2.0])
  logits = jnp.tile(jnp.array(row, jnp.float32), (1, 2000, 1))

  @jax.jit
  def sampled_and_greedy(logits):
    sampled = rl.reinforce_routing(logits, jax.random.key(0), k=2, capacity_factor=4.0)
    greedy = rl.reinforce_routing(logits, None, k=2, capacity_factor=4.0)
    return sampled.token_expert, greedy.token_expert, greedy.metrics[rl.LOG_PROB_KEY]

  sampled, greedy, greedy_log_prob = sampled_and_greedy(logits)
  probs = np_softmax(row)
  first = np.bincount(np.array(sampled)[0, :, 0], minlength=4) / 2000
  np.testing.assert_allclose(first, probs, atol=0.035)             # first draw ~ π
  pair = np.mean(np.all(np.array(sampled)[0] == [3, 0], axis=-1))  # ordered pair ~ PL
  assert pair == pytest.approx(np.exp(np_plackett_luce(probs, [3, 0])), abs=0.035)
  np.testing.assert_array_equal(np.array(greedy)[0], [[3, 0]] * 2000)
  np.testing.assert_allclose(greedy_log_prob, np_plackett_luce(probs, [3, 0]), rtol=1e-5)


def test_router_learns_the_best_arm_of_a_bandit():
  """Fixed reward per expert, learning only through the surrogate: π must move to the best
  arm, and the module's baseline must track the mean reward."""
  arm_reward = jnp.array([0.2, 0.5, 1.0, 0.1])
  # Tokens share a common direction, so one linear gate (no bias) can prefer an arm for all.
  x = jnp.array(1.0 + 0.3 * np.random.default_rng(1).normal(size=(2, 16, 8)), jnp.float32)
  router = ReinforceRouter(8, 4, k=1, capacity_factor=4.0, load_balance_weight=0.0,
                           baseline_decay=0.9, rngs=rngs(0))
  graphdef, params, others = nnx.split(router, nnx.Param, ...)

  def step(carry, _):
    params, others = carry

    def loss(params):
      module = nnx.merge(graphdef, params, others, copy=True)
      r = module(x)
      rewards = arm_reward[r.token_expert[..., 0]]
      surrogate = rl.reinforce_surrogate(r.metrics[rl.LOG_PROB_KEY], rewards,
                                         r.metrics[rl.BASELINE_KEY])
      return surrogate, (rewards, nnx.state(module, nnx.Not(nnx.Param)))

    grads, (rewards, others) = jax.grad(loss, has_aux=True)(params)
    module = nnx.merge(graphdef, jax.tree.map(lambda p, g: p - 1.0 * g, params, grads), others)
    assert layers.after_step(module, rewards) == 1
    _, params, others = nnx.split(module, nnx.Param, ...)
    return (params, others), jnp.mean(rewards)

  @jax.jit
  def train_then_eval(params, others):
    (params, others), mean_reward = jax.lax.scan(step, (params, others), None, length=100)
    module = nnx.merge(graphdef, params, others, copy=True)
    module.eval()
    greedy = module(x).token_expert
    return (greedy, jax.nn.softmax(module.gate(x), axis=-1), mean_reward, module.baseline[...],
            module.baseline_count[...])

  greedy, probs, mean_reward, baseline, count = train_then_eval(params, others)
  assert np.all(np.array(greedy) == 2)
  assert float(jnp.mean(probs[..., 2])) > 0.95
  assert float(mean_reward[0]) < 0.7 and float(mean_reward[-1]) > 0.95
  assert float(baseline) > 0.9 and int(count) == 100

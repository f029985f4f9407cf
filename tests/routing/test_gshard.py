"""GShard top-2 against a sequential numpy transcription of the paper's Algorithm 1
(with the second-choice policies and the 'after' normalisation of lingvo / fairseq)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.routing.gshard import gshard_top2, second_choice_mask

_JITTED = {}


def run(fn, *arrays, **options):
  """fn(*arrays, **options) compiled once per options (eager JAX compiles op by op,
  which is far slower on a loaded CPU)."""
  key = (fn, tuple(sorted(options.items())))
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda *a: fn(*a, **options))
  return _JITTED[key](*arrays)


def combine_of(r):
  """[G, S, E] combine weights from the slot table, in numpy."""
  slot_token, slot_weight = np.asarray(r.slot_token), np.asarray(r.slot_weight)
  g, e, c = slot_token.shape
  out = np.zeros((g, r.num_tokens + 1, e))
  for gi in range(g):
    for ei in range(e):
      out[gi, slot_token[gi, ei], ei] += slot_weight[gi, ei]
  return out[:, :-1]


def gshard(logits, uniform, **options):
  return gshard_top2(logits, uniform=uniform, **options)


def algorithm1(logits, uniform, capacity, policy='random', threshold=0.5, after=False):
  """One group. Returns combine weights [S, E] and the unweighted aux loss."""
  s, e = logits.shape
  g = np.exp(logits - logits.max(-1, keepdims=True))
  g /= g.sum(-1, keepdims=True)
  order = np.argsort(-g, axis=-1)
  e1, e2 = order[:, 0], order[:, 1]
  g1 = g[np.arange(s), e1] / (g[np.arange(s), e1] + g[np.arange(s), e2])
  g2 = 1.0 - g1
  count = np.zeros(e, int)
  kept1 = np.zeros(s, bool)
  for t in range(s):                       # first choices, token order
    if count[e1[t]] < capacity:
      kept1[t] = True
    count[e1[t]] += 1
  aux = np.mean(count / s * g.mean(0)) * e * e
  kept2 = np.zeros(s, bool)
  for t in range(s):                       # second choices after all first choices
    if policy == 'random':
      want = uniform[t] < g2[t] / threshold    # threshold 0.5: the paper's 2·g2 > U
    else:
      want = {'all': True, 'none': False, 'threshold': g2[t] > threshold}[policy]
    if want and count[e2[t]] < capacity:
      kept2[t] = True
    if want:
      count[e2[t]] += 1
  w1, w2 = g1.copy(), g2.copy()
  if after:
    raw1, raw2 = g[np.arange(s), e1] * kept1, g[np.arange(s), e2] * kept2
    total = np.where(raw1 + raw2 > 0, raw1 + raw2, 1.0)
    w1, w2 = raw1 / total, raw2 / total
  combine = np.zeros((s, e))
  combine[np.arange(s), e1] += np.where(kept1, w1, 0.0)
  combine[np.arange(s), e2] += np.where(kept2, w2, 0.0)
  return combine, aux


@pytest.mark.parametrize('policy,threshold,renormalize', [
    ('random', None, 'before'), ('random', 0.2, 'after'), ('threshold', None, 'before')])
def test_matches_algorithm_1(policy, threshold, renormalize):
  rng = np.random.default_rng(0)
  g, s, e = 3, 16, 4
  logits = rng.normal(size=(g, s, e)) * 1.5
  logits[0, :, 0] += 3.0                   # group 0 overloads expert 0: capacity drops
  uniform = rng.uniform(size=(g, s))
  r = run(gshard, logits.astype(np.float32), uniform.astype(np.float32),
                        second_policy=policy, second_threshold=threshold, renormalize=renormalize)
  assert r.capacity == 8                   # 2S/E
  combine = combine_of(r)
  thr = threshold if threshold is not None else {'random': 0.5, 'threshold': 0.2}.get(policy, 0.0)
  auxes = []
  for gi in range(g):
    ref, aux = algorithm1(logits[gi], uniform[gi], 8, policy, thr, after=renormalize == 'after')
    np.testing.assert_allclose(combine[gi], ref, atol=1e-5)
    auxes.append(aux)
  np.testing.assert_allclose(float(r.aux_losses['load_balancing']), 1e-2 * np.mean(auxes),
                             rtol=1e-4)
  assert float(r.metrics['dropped_fraction']) > 0    # group 0 overflowed


def test_capacity_convention_and_errors():
  logits = np.zeros((1, 10, 4), np.float32)
  shape = lambda **kw: jax.eval_shape(lambda z: gshard_top2(z, second_policy='all', **kw), logits)
  assert shape().capacity == 5             # ceil(2 * 10 / 4)
  assert shape(capacity=3).capacity == 3
  mesh_tf = dict(capacity_factor=1.25, capacity_include_k=False, capacity_rounding='floor')
  assert shape(**mesh_tf).capacity == 3   # int(10 * 1.25 / 4)
  with pytest.raises(ValueError, match='uniform'):
    jax.eval_shape(gshard_top2, logits)
  with pytest.raises(ValueError, match='second_policy'):
    jax.eval_shape(lambda z: gshard_top2(z, second_policy='sampling'), logits)
  with pytest.raises(ValueError, match='at least 2'):
    jax.eval_shape(lambda z: gshard_top2(z, second_policy='all'), np.zeros((1, 4, 1), np.float32))


def test_second_choice_policies():
  g2 = np.asarray([[0.05, 0.15, 0.25, 0.45]], np.float32)
  u = np.asarray([[0.3, 0.5, 0.45, 0.95]], np.float32)
  mask = lambda *a, **kw: np.asarray(second_choice_mask(*a, **kw))
  np.testing.assert_array_equal(mask(g2, 'all'), [[1, 1, 1, 1]])
  np.testing.assert_array_equal(mask(g2, 'none'), [[0, 0, 0, 0]])
  np.testing.assert_array_equal(mask(g2, 'threshold'), [[0, 0, 1, 1]])         # g2 > 0.2
  np.testing.assert_array_equal(mask(g2, 'random', uniform=u), [[0, 0, 1, 0]])  # 2·g2 > U
  np.testing.assert_array_equal(mask(g2, 'random', 0.2, uniform=u), [[0, 1, 1, 1]])  # 5·g2 > U

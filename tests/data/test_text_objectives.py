"""Span corruption and the causal shift against references written from the T5 paper's text.

Raffel et al. (2020), §3.1.4 and Fig. 2: drop 15% of the tokens in spans; replace
every run of consecutive dropped tokens by one sentinel unique within the sequence;
the target is the dropped spans, each after the sentinel that replaced it. T5's code
ends both sides with EOS and sizes examples by `random_spans_helper` (table below).
"""
import numpy as np
import pytest

from moe_jax.data import text_objectives as obj

EOS = 1
# T5's length table (inputs length -> raw tokens, targets length), from
# `random_spans_helper` at density 0.15, mean span 3; 512 -> 114 is the C4 gin's value.
T5_TABLE = {64: (70, 14), 128: (141, 29), 256: (284, 58), 512: (568, 114)}


def reference_corrupt(tokens, mask, vocab_size):
  """A token-by-token loop: the paper's rule, with T5's EOS."""
  inputs, targets, sentinel, in_span = [], [], vocab_size - 1, False
  for token, noise in zip(tokens.tolist(), mask.tolist()):
    if noise and not in_span:
      inputs.append(sentinel)
      targets.append(sentinel)
      sentinel -= 1
    (targets if noise else inputs).append(token)
    in_span = noise
  return np.array(inputs + [EOS]), np.array(targets + [EOS])


def reconstruct(inputs, targets, vocab_size, num_sentinels=100):
  """The original tokens from (inputs, targets): each input sentinel expands to the
  target tokens after the same sentinel."""
  is_sentinel = lambda t: t >= vocab_size - num_sentinels
  spans, current = {}, None
  for t in targets[:-1].tolist():
    if is_sentinel(t):
      current = spans.setdefault(t, [])
    else:
      current.append(t)
  out = []
  for t in inputs[:-1].tolist():
    out.extend(spans[t] if is_sentinel(t) else [t])
  return np.array(out)


def runs(mask):
  """Lengths of the runs of True in a bool vector."""
  padded = np.concatenate([[False], mask, [False]]).astype(int)
  d = np.diff(padded)
  return np.flatnonzero(d == -1) - np.flatnonzero(d == 1)


@pytest.mark.parametrize('inputs_length', sorted(T5_TABLE))
def test_length_formula_matches_t5_table(inputs_length):
  assert obj.raw_length_for(inputs_length) == T5_TABLE[inputs_length]


@pytest.mark.parametrize('inputs_length', [16, 33, 100, 128, 200, 512])
def test_raw_length_is_the_longest_that_fits(inputs_length):
  """Corrupting raw tokens really gives <= inputs_length inputs and the stated targets;
  one raw token more would not fit."""
  raw, targets_length = obj.raw_length_for(inputs_length)
  rng = np.random.default_rng(inputs_length)
  toks = rng.integers(3, 900, raw + 1)
  ins, tgs = obj.span_corrupt(toks[:raw], obj.random_spans_noise_mask(raw, rng), 1000)
  assert len(ins) <= inputs_length and len(tgs) == targets_length
  ins, _ = obj.span_corrupt(toks, obj.random_spans_noise_mask(raw + 1, rng), 1000)
  assert len(ins) > inputs_length


@pytest.mark.parametrize('seed', range(20))
def test_span_corrupt_equals_reference_on_any_mask(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(2, 60))
  tokens = rng.integers(3, 400, n)
  mask = rng.random(n) < rng.uniform(0.05, 0.9)      # any mask, also starting in noise
  ins, tgs = obj.span_corrupt(tokens, mask, 500)
  ref_in, ref_tg = reference_corrupt(tokens, mask, 500)
  np.testing.assert_array_equal(ins, ref_in)
  np.testing.assert_array_equal(tgs, ref_tg)
  np.testing.assert_array_equal(reconstruct(ins, tgs, 500), tokens)


def test_worked_example():
  """The module docstring's example."""
  ins, tgs = obj.span_corrupt(np.arange(10, 18), np.array([0, 0, 1, 1, 0, 0, 0, 1], bool), 100)
  assert ins.tolist() == [10, 11, 99, 14, 15, 16, 98, EOS]
  assert tgs.tolist() == [99, 12, 13, 98, 17, EOS]


@pytest.mark.parametrize('length', [2, 3, 5, 10, 33, 141, 568])
def test_noise_mask_counts(length):
  """round(15%) noise tokens in round(noise / 3) spans; T5's layout: kept first, noise last."""
  rng = np.random.default_rng(length)
  want_noise = min(max(round(length * 0.15), 1), length - 1)
  want_spans = min(max(round(want_noise / 3), 1), want_noise, length - want_noise)
  for _ in range(20):
    mask = obj.random_spans_noise_mask(length, rng)
    assert mask.shape == (length,) and mask.sum() == want_noise
    assert len(runs(mask)) == want_spans == len(runs(~mask))
    assert not mask[0] and mask[-1]


def test_noise_statistics_over_many_draws():
  """Noise fraction 0.15, mean span length 3, and spans spread over the whole segment."""
  rng = np.random.default_rng(0)
  masks = np.stack([obj.random_spans_noise_mask(568, rng) for _ in range(400)])
  lengths = np.concatenate([runs(m) for m in masks])
  assert masks.mean() == pytest.approx(85 / 568)
  assert lengths.mean() == pytest.approx(85 / 28)
  assert lengths.max() > 8                                   # lengths vary, not all 3
  per_position = masks.mean(0)[20:-20]                       # away from the fixed ends
  assert per_position.min() > 0.08 and per_position.max() < 0.23
  quarters = masks.reshape(400, 4, -1).mean((0, 2))
  np.testing.assert_allclose(quarters, 0.15, atol=0.02)


def test_sentinels_count_down_from_the_last_id():
  rng = np.random.default_rng(1)
  tokens = rng.integers(3, 900, 141)
  ins, tgs = obj.span_corrupt(tokens, obj.random_spans_noise_mask(141, rng), 1000)
  assert ins[ins >= 990].tolist() == [999, 998, 997, 996, 995, 994, 993]
  assert tgs[tgs >= 990].tolist() == [999, 998, 997, 996, 995, 994, 993]
  assert tgs[0] == 999 and ins[-1] == tgs[-1] == EOS
  np.testing.assert_array_equal(reconstruct(ins, tgs, 1000), tokens)


def test_shift_right_within_segments():
  targets = np.array([[5, 6, 7, 8, 9, 0], [3, 4, 5, 6, 7, 8]])
  segments = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  want = np.array([[0, 5, 0, 7, 8, 0], [0, 3, 4, 5, 6, 7]])
  np.testing.assert_array_equal(obj.shift_right(targets, segments), want)


def test_too_short_segment_is_an_error():
  with pytest.raises(ValueError, match='at least 2'):
    obj.noise_counts(1)

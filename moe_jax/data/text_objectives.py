"""Text objectives in numpy: T5 span corruption, causal-LM targets, lengths.

Span corruption (Raffel et al. 2020, §3.1.4): a fraction `noise_density` of a raw
segment's tokens, in spans of mean length `mean_noise_span_length`, is dropped from the
inputs; each dropped span is replaced by one sentinel id; the targets list, for every
span, its sentinel followed by the dropped tokens. Both end with EOS:

    raw      = a b c d e f g h
    mask     = 0 0 1 1 0 0 0 1          (spans 'c d' and 'h')
    inputs   = a b <s0> e f g <s1> EOS
    targets  = <s0> c d <s1> h EOS

Sentinel i is `vocab_size - 1 - i` (T5 / seqio: <extra_id_0> is the last id).
All functions are pure; randomness comes from the numpy Generator passed in.
"""
from __future__ import annotations

import numpy as np

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


def noise_counts(length: int, noise_density: float = NOISE_DENSITY,
                 mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
  """(noise tokens, noise spans) for a raw segment of `length` >= 2 tokens.

  As T5: noise tokens = round(length * density) kept within [1, length - 1]; spans =
  round(noise / mean span length), at least 1. Python's round (half to even) is what
  T5's length table (inputs 512 -> targets 114) depends on.
  """
  if length < 2:
    raise ValueError(f'span corruption needs at least 2 tokens, got {length}.')
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
  # Every span, noise or not, holds at least one token.
  return num_noise, min(num_spans, num_noise, length - num_noise)


def corrupted_lengths(length: int, noise_density: float = NOISE_DENSITY,
                      mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
  """(inputs length, targets length) of a corrupted raw segment, EOS included."""
  num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
  return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def raw_length_for(inputs_length: int, noise_density: float = NOISE_DENSITY,
                   mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
  """T5's `random_spans_helper`: the longest raw segment whose corrupted inputs fit.

  Returns (raw tokens per example, targets length); e.g. inputs 128 -> (141, 29),
  512 -> (568, 114).
  """
  raw = inputs_length
  while corrupted_lengths(raw + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
    raw += 1
  targets_length = corrupted_lengths(raw, noise_density, mean_noise_span_length)[1]
  if noise_density == 0.5 and targets_length > inputs_length:
    # T5's one special case: at density 0.5 targets may outgrow inputs by one.
    raw, targets_length = raw - 1, targets_length - 1
  return raw, targets_length


def _random_composition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
  """`parts` positive integers summing to `total`, uniform over all such compositions."""
  cuts = np.sort(rng.choice(total - 1, parts - 1, replace=False)) + 1
  return np.diff(np.concatenate([[0], cuts, [total]]))


def random_spans_noise_mask(length: int, rng: np.random.Generator,
                            noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> np.ndarray:
  """[length] bool, True on noise: spans alternate kept, noise, kept, noise, ... (T5's layout).

  The noise and the kept tokens are each split into `num_spans` spans of random
  positive lengths, so the segment starts with kept tokens and ends with noise.
  """
  num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
  noise = _random_composition(num_noise, num_spans, rng)
  kept = _random_composition(length - num_noise, num_spans, rng)
  runs = np.stack([kept, noise], axis=1).reshape(-1)                   # [2 * spans]
  return np.repeat(np.tile([False, True], num_spans), runs)


def sentinel_ids(vocab_size: int, count: int) -> np.ndarray:
  """[count] the first `count` sentinels: vocab_size - 1, vocab_size - 2, ..."""
  return vocab_size - 1 - np.arange(count)


def span_corrupt(tokens: np.ndarray, noise_mask: np.ndarray, vocab_size: int,
                 eos_id: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """tokens, noise_mask: [n] -> (inputs [n_in], targets [n_tg]), int32, each ending in EOS.

  Inputs keep the non-noise tokens and put sentinel i where noise span i was; targets
  list sentinel i followed by noise span i, for every span in order. (For T5's masks,
  which start kept and end in noise, this is T5's `noise_span_to_unique_sentinel` /
  `nonnoise_span_to_unique_sentinel` pair.)
  """
  tokens = np.asarray(tokens, np.int32)
  noise_mask = np.asarray(noise_mask, bool)
  prev = np.concatenate([[False], noise_mask[:-1]])
  noise_start = noise_mask & ~prev                          # [n] first token of each noise span
  span_index = np.cumsum(noise_start) - 1                   # [n] the noise span a token is in/after
  sentinels = sentinel_ids(vocab_size, int(noise_start.sum())).astype(np.int32)
  inputs = np.where(noise_start, sentinels[np.maximum(span_index, 0)] if len(sentinels) else 0,
                    tokens)[~noise_mask | noise_start]
  # Each sentinel goes before the first noise token of its span.
  rank = np.cumsum(noise_mask) - 1                          # [n] index among noise tokens
  targets = np.insert(tokens[noise_mask], rank[noise_start], sentinels)
  eos = np.array([eos_id], np.int32)
  return np.concatenate([inputs, eos]), np.concatenate([targets, eos])


def shift_right(targets: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
  """targets, segment_ids: [..., L] -> decoder inputs [..., L]: 0 at each segment's start.

  Within a segment, input t is target t - 1, so position t predicts target t from
  targets before it only; nothing flows from one packed segment into the next.
  """
  shifted = np.zeros_like(targets)
  shifted[..., 1:] = targets[..., :-1]
  start = np.ones_like(segment_ids, bool)
  start[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
  return np.where(start, 0, shifted).astype(targets.dtype)

"""Statistics of a comparison over seeds: mean ± sd per arm, paired differences, verdicts.

Arms of an experiment share their seeds (seed s of arm A and seed s of arm B see the
same data order and the same evaluation set), so two arms are compared through the
per-seed differences d_s = m_A(s) − m_B(s):

    mean d ± t_{0.975, n−1} · sd(d) / sqrt(n)         (95% interval, Student's t)

and the verdict reads the interval: entirely on A's side -> "A better than B", entirely
on B's side -> "B better than A", containing 0 (or fewer than 2 paired seeds) ->
"not resolved at this budget". `higher_is_better` says which side is A's.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats as scipy_stats

NOT_RESOLVED = 'not resolved at this budget'


@dataclasses.dataclass(frozen=True)
class Summary:
  """Mean and sample standard deviation (ddof=1; 0 for one value) of n values."""
  mean: float
  sd: float
  n: int

  @classmethod
  def of(cls, values) -> Summary:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if v.size == 0:
      return cls(float('nan'), float('nan'), 0)
    return cls(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size))


@dataclasses.dataclass(frozen=True)
class PairedDifference:
  """A − B over the seeds both arms finished: mean, sd, n and the 95% interval."""
  a: str
  b: str
  mean: float
  sd: float
  n: int
  low: float
  high: float
  seeds: tuple[int, ...]


def paired_difference(a: str, b: str, values_a: dict, values_b: dict,
                      confidence: float = 0.95) -> PairedDifference:
  """Paired difference of two arms from {seed: value} dicts (seeds in both count)."""
  seeds = tuple(sorted(set(values_a) & set(values_b)))
  d = np.asarray([values_a[s] - values_b[s] for s in seeds], np.float64)
  n = int(d.size)
  if n == 0:
    return PairedDifference(a, b, float('nan'), float('nan'), 0, float('nan'), float('nan'), seeds)
  mean = float(d.mean())
  if n < 2:
    return PairedDifference(a, b, mean, float('nan'), n, float('nan'), float('nan'), seeds)
  sd = float(d.std(ddof=1))
  half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
  return PairedDifference(a, b, mean, sd, n, mean - half, mean + half, seeds)


def verdict(diff: PairedDifference, *, higher_is_better: bool = True) -> str:
  """'<A> better than <B>', '<B> better than <A>' or 'not resolved at this budget'."""
  if diff.n < 2 or not (math.isfinite(diff.low) and math.isfinite(diff.high)):
    return NOT_RESOLVED
  low, high = (diff.low, diff.high) if higher_is_better else (-diff.high, -diff.low)
  if low > 0:
    return f'{diff.a} better than {diff.b}'
  if high < 0:
    return f'{diff.b} better than {diff.a}'
  return NOT_RESOLVED

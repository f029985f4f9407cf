"""Paired comparison statistics against hand-computed values, and the verdict's words."""
import math

import numpy as np
import pytest

from moe_jax.experiments import stats

# Student's t quantiles t_{0.975, dof} from a printed table (two-sided 95%).
T_TABLE = {1: 12.706, 2: 4.303, 4: 2.776}


def test_summary_is_mean_and_sample_sd():
  s = stats.Summary.of([0.80, 0.82, 0.87])
  assert s.n == 3 and s.mean == pytest.approx(0.83)
  assert s.sd == pytest.approx(math.sqrt(((0.03) ** 2 + 0.01 ** 2 + 0.04 ** 2) / 2))
  assert stats.Summary.of([0.5]).sd == 0.0 and stats.Summary.of([]).n == 0


@pytest.mark.parametrize('n', [2, 3, 5])
def test_paired_interval_is_the_t_interval_of_the_differences(n):
  rng = np.random.default_rng(n)
  a = {s: 0.85 + 0.01 * rng.normal() for s in range(n)}
  b = {s: a[s] - 0.004 + 0.003 * rng.normal() for s in range(n)}
  b[99] = 0.1                                           # unpaired seed: ignored
  d = np.array([a[s] - b[s] for s in range(n)])
  half = T_TABLE[n - 1] * d.std(ddof=1) / math.sqrt(n)
  got = stats.paired_difference('A', 'B', a, b)
  assert got.n == n and got.seeds == tuple(range(n))
  assert got.mean == pytest.approx(d.mean())
  assert got.low == pytest.approx(d.mean() - half, abs=5e-4 * abs(half) + 1e-12)
  assert got.high == pytest.approx(d.mean() + half, abs=5e-4 * abs(half) + 1e-12)


def test_verdict_reads_the_interval():
  better = stats.paired_difference('soft', 'dense', {0: 0.9, 1: 0.91, 2: 0.92},
                                   {0: 0.8, 1: 0.815, 2: 0.82})
  assert stats.verdict(better) == 'soft better than dense'
  assert stats.verdict(better, higher_is_better=False) == 'dense better than soft'
  worse = stats.paired_difference('soft', 'dense', {0: 0.8, 1: 0.81, 2: 0.805},
                                  {0: 0.9, 1: 0.92, 2: 0.91})
  assert stats.verdict(worse) == 'dense better than soft'
  noisy = stats.paired_difference('soft', 'dense', {0: 0.9, 1: 0.8, 2: 0.85},
                                  {0: 0.8, 1: 0.9, 2: 0.86})
  assert stats.verdict(noisy) == stats.NOT_RESOLVED == 'not resolved at this budget'
  one_seed = stats.paired_difference('soft', 'dense', {0: 0.99}, {0: 0.1})
  assert one_seed.n == 1 and stats.verdict(one_seed) == 'not resolved at this budget'

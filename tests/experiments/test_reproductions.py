"""The README's Reproductions table: generated from the committed summaries, never typed."""
import pytest

from moe_jax.experiments import reproductions, run


def test_readme_holds_exactly_the_generated_table():
  with open(reproductions.README) as f:
    block = reproductions.readme_block(f.read())
  assert block is not None, 'README.md lost its reproductions markers'
  assert block == reproductions.markdown(), (
      'README.md is out of date: python -m moe_jax.experiments.reproductions --write')


def test_every_claim_names_arms_of_its_experiment():
  rows = reproductions.rows()
  assert len(rows) >= 20
  for exp, row in rows:
    for c in exp.claims:
      spec = reproductions.summary_lib.comparison_spec(c['comparison'])
      names = {a['name'] for a in exp.arms}
      assert spec['a'] in names and spec['b'] in names, (exp.name, c)
      assert c.get('expect') in ('a', 'b', 'a_or_tie', None)


@pytest.mark.parametrize('verdict, expect, want', [
    ('A better than B', 'a', 'yes'), ('B better than A', 'a', 'no'),
    ('not resolved at this budget', 'a', 'not resolved'), ('B better than A', 'b', 'yes'),
    ('not resolved at this budget', 'a_or_tie', 'yes'), ('B better than A', 'a_or_tie', 'no'),
    ('A better than B', None, '—')])
def test_agreement_with_the_papers_direction(verdict, expect, want):
  assert reproductions.agreement(verdict, dict(a='A', b='B'), expect) == want


def test_claim_row_reads_the_summary_with_the_runners_statistics(tmp_path):
  exp = run.load_experiment('experiments/t5_switch_dense.py')
  exp.file = 't5_switch_dense.py'
  runs = []
  for s in range(3):
    for arm, nlp in (('dense', -4.20), ('switch_e32', -4.10)):
      runs.append(dict(arm=arm, seed=s, metric=nlp + 0.01 * s * (arm == 'dense'),
                       derived={'speedup_steps': 2.0 + s if arm != 'dense' else 1.0}))
  summary = dict(metric_scale=1.0, runs=runs, arms={
      'dense': dict(metric=dict(mean=-4.19, sd=0.01, n=3), derived={'speedup_steps': dict(mean=1.0, sd=0.0, n=3)}),
      'switch_e32': dict(metric=dict(mean=-4.10, sd=0.0, n=3),
                         derived={'speedup_steps': dict(mean=3.0, sd=1.0, n=3)})})
  claim = exp.claims[0]
  assert tuple(claim['comparison']) == ('switch_e32', 'dense')
  row = reproductions.claim_row(exp, claim, summary)
  assert row['verdict'] == 'switch_e32 better than dense' and row['agrees'] == 'yes'
  assert row['ours'].startswith('switch_e32: -4.100 ± 0.000; dense: -4.190 ± 0.010; Δ 0.090')
  assert '3 seeds' in row['ours']
  speed = reproductions.claim_row(exp, dict(claim, show='speedup_steps'), summary)
  assert 'switch_e32: 3.000 ± 1.000' in speed['ours']
  assert reproductions.claim_row(exp, claim, None)['verdict'] == reproductions.NOT_RUN

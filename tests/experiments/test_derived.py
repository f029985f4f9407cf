"""Derived per-run metrics against hand-computed values: steps (and seconds) to a paired
reference's final quality, differences, ratios, loss spikes, eval routing metrics."""
import math

import pytest

from moe_jax.experiments import derived

# (step, quality, training seconds) at each evaluation
DENSE = dict(arm='dense', seed=0, group='dense', metric=-4.0,
             curve=[[100, -4.6, 20.0], [200, -4.3, 40.0], [300, -4.1, 60.0], [400, -4.0, 80.0]])
MOE = dict(arm='moe', seed=0, group='moe', metric=-3.8,
           curve=[[100, -4.5, 30.0], [200, -4.05, 60.0], [300, -3.95, 90.0], [400, -3.8, 120.0]])


def test_steps_to_target_interpolates_where_the_curve_reaches_the_references_final():
  by_arm = {'dense': DENSE, 'moe': MOE}
  # -4.0 is reached between step 200 (-4.05) and 300 (-3.95): halfway, 250 steps, 75 s.
  assert derived.steps_to_target(MOE, by_arm, reference='dense') == pytest.approx(250.0)
  assert derived.steps_to_target(MOE, by_arm, reference='dense', output='seconds') == pytest.approx(75.0)
  assert derived.steps_to_target(MOE, by_arm, reference='dense',
                                 output='speedup_steps') == pytest.approx(400 / 250)
  assert derived.steps_to_target(MOE, by_arm, reference='dense',
                                 output='speedup_seconds') == pytest.approx(80 / 75)
  # The reference reaches its own final at its last evaluation.
  assert derived.steps_to_target(DENSE, by_arm, reference='dense') == pytest.approx(400.0)


def test_steps_to_target_none_when_never_reached_and_lower_is_better_curves():
  worse = dict(MOE, curve=[[100, -4.9, 10.0], [400, -4.2, 40.0]])
  assert derived.steps_to_target(worse, {'dense': DENSE}, reference='dense') is None
  assert derived.steps_to_target(MOE, {}, reference='dense') is None            # no reference
  loss_ref = dict(DENSE, curve=[[100, 3.0, 1.0], [200, 2.0, 2.0]])
  loss = dict(MOE, curve=[[100, 2.5, 1.0], [200, 1.5, 2.0]])
  assert derived.steps_to_target(loss, {'dense': loss_ref}, reference='dense',
                                 higher_is_better=False) == pytest.approx(150.0)
  # Reached at the first evaluation: that evaluation's step (no point before it).
  early = dict(MOE, curve=[[100, -3.0, 5.0], [200, -2.9, 10.0]])
  assert derived.steps_to_target(early, {'dense': DENSE}, reference='dense') == 100.0
  with pytest.raises(ValueError, match='output'):
    derived.steps_to_target(MOE, {'dense': DENSE}, reference='dense', output='nope')


def test_values_differences_ratios_and_first_of():
  row = dict(metric=-3.0, final={'validation_loss': 3.0}, step_time_s=0.5,
             evals={'causal': {'neg_log_perplexity': -3.2}}, derived={})
  ref = dict(step_time_s=0.25, group='g')
  assert derived.value(row, 'final.validation_loss') == 3.0
  assert derived.value(row, 'evals.causal.neg_log_perplexity') == -3.2
  assert derived.value(row, 'evals.other.x') is None
  assert derived.difference(row, {}, a='metric', b='evals.causal.neg_log_perplexity') == pytest.approx(0.2)
  assert derived.ratio_to(row, {'r': ref}, reference='r') == 2.0
  assert derived.ratio_to(dict(row, group='g'), {'r': ref}, reference={'g': 'r'}) == 2.0
  assert derived.ratio_to(dict(row, group='h'), {'r': ref}, reference={'g': 'r'}) is None
  assert derived.first_of(row, {}, keys=('evals.causal.neg_log_perplexity', 'metric')) == -3.2
  assert derived.first_of(dict(row, evals={}), {}, keys=('evals.causal.x', 'metric')) == -3.0


@pytest.mark.parametrize('train_loss, skipped, diverged, want', [
    ([[5, 8.0], [10, 6.0], [15, 5.0], [20, 5.4]], 0, None, 0.0),      # +0.4 < 0.5: no spike
    ([[5, 8.0], [10, 6.0], [15, 5.0], [20, 5.6]], 0, None, 1.0),      # +0.6 above the minimum
    ([[5, 8.0], [10, 9.0], [15, 5.0]], 0, None, 0.0),                 # rise before after_step
    ([[5, 8.0], [10, float('nan')]], 0, None, 1.0),                   # non-finite logged loss
    ([[5, 8.0], [10, 7.0]], 3, None, 1.0),                            # skipped steps
    ([], 0, 'stopped at step 7', 1.0),                                # diverged run
])
def test_loss_spike(train_loss, skipped, diverged, want):
  row = dict(train_loss=train_loss, skipped_steps=skipped, diverged=diverged)
  assert derived.loss_spike(row, {}, threshold=0.5, after_step=10) == want


def test_eval_routing_reduces_over_layers():
  row = dict(last_eval={'eval/routing/decoder/block_01/router_logit_max': 3.0,
                        'eval/routing/decoder/block_03/router_logit_max': 5.0,
                        'eval/routing/decoder/block_03/router_z_loss': 9.0, 'eval/loss': 1.0})
  assert derived.eval_routing(row, {}, name='router_logit_max') == 5.0
  assert derived.eval_routing(row, {}, name='router_logit_max', reduce='mean') == 4.0
  assert derived.eval_routing(dict(last_eval={}), {}) is None


def test_compute_runs_definitions_in_order_per_seed():
  rows = [dict(DENSE), dict(MOE), dict(DENSE, seed=1), dict(MOE, seed=1, curve=[[400, -5.0, 1.0]])]
  derived.compute([dict(name='steps', fn='steps_to_target', kwargs=dict(reference='dense')),
                   dict(name='twice', fn='value', kwargs=dict(key='steps'))], rows)
  assert rows[1]['derived']['steps'] == pytest.approx(250.0) and rows[3]['derived']['steps'] is None
  assert rows[1]['derived']['twice'] == pytest.approx(250.0)
  with pytest.raises(ValueError, match='unknown fn'):
    derived.compute([dict(name='x', fn='nope')], rows)
  assert not math.isnan(rows[0]['derived']['steps'])

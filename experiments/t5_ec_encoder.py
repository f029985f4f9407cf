r"""Expert choice vs token choice in the encoder of a T5 (the leak-free T5X setup),
capacity factors 0.5 / 1 / 2 (Zhou et al. 2022, Expert Choice routing, Fig. 4a and
Table 2 analogue).

    python -m moe_jax.experiments.run --experiment=experiments/t5_ec_encoder.py --lock=/tmp/cpu.lock

`configs/t5/span_corruption.py` tiny (d 128, 2+2 blocks, 8 experts every other block of
each stack) on debian_docs. Only the encoder's router changes between arms; every
decoder uses top-2 token choice (capacity 1.25 / 2.0), as T5X's expert-choice recipe
does, so no arm reads future target tokens. Encoder arms: expert choice with capacity
factor 0.5, 1 and 2 (EC-CF0.5/1/2: on average 0.5, 1 and 2 experts per token); token
choice top-1 and top-2 (capacity 1.25 / 2.0, balancing loss 1e-2). STEPS steps, 3 paired
seeds. Equal compute pairs: EC-CF1 vs top-1, EC-CF2 vs top-2.

Tuning budget: none (the config file's optimiser; EC without aux loss, as the paper).
Expected (lm-experiments.md §5.2): small gaps (<= 0.02 nats) at this scale; the paper's
CF ordering CF2 > CF1 > CF0.5 may be resolvable. Cost: estimated with `--estimate=60` (experiments/estimates/t5_ec_encoder_cpu.json, before TCMalloc): 1.1 h for 3 of its 5 arms (3 seeds each; the others train in an earlier config or were not estimated) (5–10 min per run); not run yet.

Variants: cpu, smoke (two tiny arms, two seeds, 4 steps).
"""
from moe_jax.experiments import presets as P

STEPS, EVALS = 1200, 6
EC = {'ec_cf0.5': 0.5, 'ec_cf1': 1.0, 'ec_cf2': 2.0}
TC = {'tc_top1': 1, 'tc_top2': 2}


def get_config(variant=None):
  c = P.experiment('t5_ec_encoder', variant, 'Expert choice vs token choice in the T5 encoder',
                   P.SPAN, metric='neg_log_perplexity')
  smoke = c.name.endswith('smoke')
  common = P.smoke(P.SPAN) if smoke else P.schedule(STEPS, evals=EVALS)
  if smoke:
    common = P.merge(common, {'model.encoder_moe.num_experts': 4,
                              'model.decoder_moe.num_experts': 4})
  ec = {'ec_cf1': 1.0} if smoke else EC
  tc = {'tc_top1': 1} if smoke else TC
  # experts_choice,tiny: EC in the encoder, top-2 token choice in the decoder (config file).
  c.arms = ([P.arm(n, 'experts_choice,tiny',
                   P.merge(common, {'model.encoder_moe.router_kwargs.capacity_factor': cf}),
                   group='experts choice', label=f'cf {cf:g}', x=cf) for n, cf in ec.items()] +
            [P.arm(n, 'tokens_choice,tiny',
                   P.merge(common, {'model.encoder_moe.router_kwargs.k': k}),
                   group='tokens choice', label=f'top-{k}', x=k) for n, k in tc.items()])
  if smoke:
    c.comparisons = [('ec_cf1', 'tc_top1')]
  else:
    c.comparisons = [('ec_cf1', 'tc_top1'), ('ec_cf2', 'tc_top2'), ('ec_cf0.5', 'tc_top1'),
                     ('ec_cf2', 'ec_cf1'), ('ec_cf1', 'ec_cf0.5'), ('tc_top2', 'tc_top1')]
  c.notes = ('No per-arm tuning. Decoder of every arm: top-2 token choice (capacity 1.25/2.0). '
             'Encoder EC: no aux loss; encoder TC: balance loss 1e-2, capacity 1.25/2.0.')
  c.otherwise = ('gaps of <= 0.02 nats are expected at this scale (8 experts, 1.2k steps; the '
                 'paper: 64 experts, GLaM data)')
  c.claims = [
      dict(paper='Expert Choice (Zhou et al. 2022), Fig. 2 / Table 2',
           claim='EC-CF2 beats top-2 token choice at equal compute (encoder, leak-free)',
           paper_value='< 1/2 the steps to GShard top-2 perplexity; GLUE 84.0 vs 82.2 (100M/64E)',
           comparison=('ec_cf2', 'tc_top2'), expect='a'),
      dict(paper='Expert Choice, Fig. 4a (capacity factor ablation)',
           claim='EC-CF1 beats top-1 token choice at equal compute',
           paper_value='EC-CF1 better than Switch top-1', comparison=('ec_cf1', 'tc_top1'),
           expect='a'),
      dict(paper='Expert Choice, Fig. 4a', claim='Capacity factor 2 beats 1',
           paper_value='CF2 > CF1 > CF0.5', comparison=('ec_cf2', 'ec_cf1'), expect='a'),
      dict(paper='Expert Choice, Fig. 4a', claim='Capacity factor 1 beats 0.5',
           paper_value='CF2 > CF1 > CF0.5', comparison=('ec_cf1', 'ec_cf0.5'), expect='a'),
  ]
  return c

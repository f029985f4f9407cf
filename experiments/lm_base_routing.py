r"""BASE, Sinkhorn-BASE and REINFORCE routing against Switch and hashing in a decoder LM
(Lewis et al. 2021, BASE layers; Clark et al. 2022, "Unified Scaling Laws for Routed
Language Models": S-BASE > RL-R > Hash).

    python -m moe_jax.experiments.run --experiment=experiments/lm_base_routing.py --lock=/tmp/cpu.lock

Decoder LM `configs/t5/causal_lm.py` tiny, MoE every other block, 16 experts, 600 steps,
3 paired seeds (`moe_jax.experiments.decoder_arms`; shares dense, Switch and the random
hash with the other decoder experiments in workdirs/lm_decoder). BASE and Sinkhorn-BASE
assign tokens by a balanced assignment over the whole sequence (and, for BASE, a shuffle
across the batch) in training, so they train with `allow_future_leak=True`; at
evaluation both route greedily (each token to its highest-scoring expert, nothing
dropped), the causal rule their papers use at test time, so the validation loss has no
leak (`tests/layers/test_causal_eval_rules.py` checks that eval-mode logits at t do not
move when later tokens change). REINFORCE samples its expert in training and takes the
argmax at evaluation (causal both ways).

Tuning budget: none; the config file's optimiser and each router's paper defaults (BASE
centroid gain 0.1; S-BASE sigmoid gate, Sinkhorn to tolerance 1e-3; RL-R baseline decay
0.99, balance loss 1e-2). Expected (lm-experiments.md §5.4): gaps of 0.01-0.03 nats;
the ordering S-BASE >= BASE ~ Switch > hash is plausible, not assured.

Cost: estimated with `--estimate=60` (experiments/estimates/lm_base_routing_cpu.json, before TCMalloc): 2.2 h for all 6 arms (3 seeds each) (6–14 min per run); not run yet.

Variants: cpu, smoke (two tiny arms, two seeds, 4 steps).
"""
from moe_jax.experiments import decoder_arms as D

ARMS = ('dense', 'switch', 'base', 'sinkhorn_base', 'reinforce', 'hash_random')


def get_config(variant=None):
  c = D.experiment('lm_base_routing', variant, 'BASE / S-BASE / REINFORCE vs Switch, decoder LM')
  variant = c.name.rsplit('_', 1)[1]
  c.arms = D.arms(('switch', 'sinkhorn_base') if variant == 'smoke' else ARMS, variant)
  if variant == 'smoke':
    c.comparisons = [('sinkhorn_base', 'switch')]
  else:
    c.comparisons = [('sinkhorn_base', 'switch'), ('base', 'switch'), ('reinforce', 'switch'),
                     ('sinkhorn_base', 'reinforce'), ('reinforce', 'hash_random'),
                     ('sinkhorn_base', 'base'), ('base', 'dense')]
  c.notes = ('No per-arm tuning: the config file\'s AdamW 3e-3 and each router\'s paper '
             'defaults. BASE / S-BASE evaluated with greedy top-1 (causal).')
  c.otherwise = ('routing gains shrink with scale differences and fall below seed noise at 5M '
                 'parameters and 2.5M tokens')
  c.claims = [
      dict(paper='Clark et al. 2022 (routed LMs), S-BASE vs RL-R vs Hash',
           claim='Sinkhorn-BASE beats REINFORCE routing', paper_value='S-BASE > RL-R at every size',
           comparison=('sinkhorn_base', 'reinforce'), expect='a'),
      dict(paper='Clark et al. 2022', claim='REINFORCE routing beats hash routing',
           paper_value='RL-R > Hash at every size', comparison=('reinforce', 'hash_random'),
           expect='a'),
      dict(paper='BASE layers (Lewis et al. 2021)',
           claim='BASE matches or beats Switch at equal compute',
           paper_value='comparable or better perplexity than Switch at equal compute',
           comparison=('base', 'switch'), expect='a_or_tie'),
  ]
  return c

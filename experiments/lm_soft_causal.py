r"""Causal Soft MoE (ours) against token choice and dense in a decoder LM.

    python -m moe_jax.experiments.run --experiment=experiments/lm_soft_causal.py --lock=/tmp/cpu.lock

Soft MoE mixes every token of a sequence into every slot, so it cannot go into a decoder;
`soft_moe_causal` (`moe_jax/routing/soft_causal.py`) ties each slot to a position so
that token t mixes tokens <= t only (one slot instance per position, experts cycled over
time). Decoder LM `configs/t5/causal_lm.py` tiny, MoE every other block, 16 experts,
600 steps, 3 paired seeds (`moe_jax.experiments.decoder_arms`, shared runs in
workdirs/lm_decoder): dense, Switch top-1, top-2 token choice (capacity 1.25 / 2.0),
causal Soft MoE (1 slot instance per position, 1 slot parameter per expert).

No paper number exists (the Soft MoE paper leaves decoders to future work); the claim
tested is ours: that the causal variant keeps Soft MoE's advantage over token choice.
Tuning budget: none (the config file's optimiser). Cost: estimated with `--estimate=60` (experiments/estimates/lm_soft_causal_cpu.json, before TCMalloc): 0.8 h for 2 of its 4 arms (3 seeds each; the others train in an earlier config or were not estimated) (6–9 min per run); not run yet.

Variants: cpu, smoke (two tiny arms, two seeds, 4 steps).
"""
from moe_jax.experiments import decoder_arms as D

ARMS = ('dense', 'switch', 'top2', 'soft_moe_causal')


def get_config(variant=None):
  c = D.experiment('lm_soft_causal', variant, 'Causal Soft MoE vs token choice, decoder LM')
  variant = c.name.rsplit('_', 1)[1]
  c.arms = D.arms(('dense', 'soft_moe_causal') if variant == 'smoke' else ARMS, variant)
  c.comparisons = ([('soft_moe_causal', 'dense')] if variant == 'smoke' else
                   [('soft_moe_causal', 'top2'), ('soft_moe_causal', 'switch'),
                    ('soft_moe_causal', 'dense'), ('top2', 'switch'), ('switch', 'dense')])
  c.notes = 'No per-arm tuning: the config file\'s AdamW 3e-3; router defaults.'
  c.otherwise = ('our extension has no paper number; slots tied to positions see prefixes of '
                 'different lengths')
  c.claims = [
      dict(paper='ours (Soft MoE paper: decoders left to future work)',
           claim='Causal Soft MoE beats top-2 token choice in a decoder',
           paper_value='none (encoder-only in the paper: Soft MoE > token choice, Fig. 3)',
           comparison=('soft_moe_causal', 'top2'), expect='a'),
      dict(paper='ours', claim='Causal Soft MoE beats the dense decoder',
           paper_value='none', comparison=('soft_moe_causal', 'dense'), expect='a'),
  ]
  return c

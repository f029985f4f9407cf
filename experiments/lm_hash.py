r"""Hash layers in a decoder LM: the hash kinds against each other and against Switch
(Roller et al. 2021, "Hash Layers For Large Sparse Models", Tables 2-3 analogue).

    python -m moe_jax.experiments.run --experiment=experiments/lm_hash.py --lock=/tmp/cpu.lock
    python -m moe_jax.experiments.run --experiment=experiments/lm_hash.py --dry_run

Decoder LM `configs/t5/causal_lm.py` tiny (d 128, 4 blocks, vocab 4096, 128-token rows,
batch 32) on debian_docs, MoE every other block with 16 experts, 600 steps (2.5M target
tokens), 6 evaluations; 3 paired seeds. Arms (`moe_jax.experiments.decoder_arms`):
dense; Switch top-1; hash layers of kind balanced, random, dispersed, clustered, bigram,
previous, position, and the oracle 'next' (the NEXT token's id, a leak: it must beat
everything by far, which checks that a leak shows up), all with the dropless engine (no
capacity, as the paper). balanced / clustered / dispersed tables are built before the
hash arms by the prepare hook (`moe_jax.experiments.hash_tables`): balanced from token
frequencies of the tokenised train split, clustered / dispersed by k-means (seed 0) of
the input embeddings of the dense arm's seed-0 run; files under
workdirs/lm_decoder/hash_tables/ with a manifest each.

Tuning budget: none per arm; every arm uses the config file's AdamW (3e-3, 100 warm-up
steps, cosine) and router defaults. Differences from the paper: 2 MoE layers (the paper
replaces one), 16 experts (paper 16-128), 2.5M tokens of technical English with a
4k-piece unigram vocabulary (paper: pushshift.io Reddit, BPE), models of 5M parameters.
Expected (lm-experiments.md §5.3): the kind ordering (clustered, position, previous worse
than balanced / random by 0.03-0.08 nats in the paper) may be resolvable; hash vs Switch
(0.02 nats in the paper) is at the noise floor and may flip at this scale.

Cost: shares dense / Switch / hash_random with the other decoder experiments
(workdirs/lm_decoder); not measured yet (no estimate run; not run). A decoder run of 600
steps takes about 4 min on 2 cores (lm_ec_leak).

Variants: cpu (the experiment), smoke (two tiny arms, two seeds, 4 steps; the test suite).
"""
from moe_jax.experiments import decoder_arms as D

ARMS = ('dense', 'switch') + tuple(f'hash_{k}' for k in D.HASH_KINDS)
SMOKE_ARMS = ('dense', 'hash_clustered')


def get_config(variant=None):
  c = D.experiment('lm_hash', variant, 'Hash layers vs Switch, decoder LM')
  variant = c.name.rsplit('_', 1)[1]
  names = SMOKE_ARMS if variant == 'smoke' else ARMS
  c.arms = D.arms(names, variant)
  kinds = [n[5:] for n in names if n.startswith('hash_') and n[5:] in D.TABLE_KINDS]
  c.prepare = [D.hash_tables_prepare(variant, kinds)] if kinds else []
  if variant == 'smoke':
    c.comparisons = [('hash_clustered', 'dense')]
  else:
    c.comparisons = ([('hash_balanced', f'hash_{k}') for k in D.HASH_KINDS if k != 'balanced'] +
                     [('hash_balanced', 'switch'), ('hash_random', 'switch'),
                      ('switch', 'dense'), ('hash_balanced', 'dense')])
  c.cost_axes = ('train_flops', 'train_time_s', 'process_cpu_s')
  c.notes = ('Every arm: the config file\'s AdamW 3e-3, 100 warm-up steps, cosine; no per-arm '
             'tuning. Tables: balanced from train-split token counts; clustered / dispersed '
             'from k-means (seed 0) of the dense arm\'s seed-0 input embeddings.')
  c.otherwise = ('5M-parameter models, 2.5M tokens of technical English, a 4k unigram vocabulary '
                 '(the paper: Reddit, BPE, 16-128 experts, one hash layer)')
  c.claims = [
      dict(paper='Hash Layers (Roller et al. 2021), Table 2 (pushshift.io Reddit)',
           claim='A balanced hash layer is at least as good as Switch routing',
           paper_value='test ppl 23.16 (balanced hash, 1x64) vs 23.73 (Switch 1x64): '
                       '-0.024 nats',
           comparison=('hash_balanced', 'switch'), expect='a'),
      dict(paper='Hash Layers, Table 3 (hash kinds)',
           claim='Balanced hash beats clustered hash (similar tokens in one expert)',
           paper_value='valid ppl 23.16 vs 23.90 (+0.031 nats)',
           comparison=('hash_balanced', 'hash_clustered'), expect='a'),
      dict(paper='Hash Layers, Table 3', claim='Balanced hash beats the position hash',
           paper_value='valid ppl 23.16 vs 25.07 (+0.079 nats)',
           comparison=('hash_balanced', 'hash_position'), expect='a'),
      dict(paper='Hash Layers, Table 3', claim='Balanced hash beats the previous-token hash',
           paper_value='valid ppl 23.16 vs 24.16 (+0.042 nats)',
           comparison=('hash_balanced', 'hash_previous'), expect='a'),
      dict(paper='Hash Layers, Table 3', claim='Balanced and random hashes are about equal',
           paper_value='valid ppl 23.16 vs 23.22 (0.003 nats)',
           comparison=('hash_balanced', 'hash_random'), expect=None),
      dict(paper='Hash Layers, Table 3', claim='The oracle next-token hash leaks the answer',
           paper_value='valid ppl 1.97 vs 23.16',
           comparison=('hash_next', 'hash_balanced'), expect='a'),
  ]
  return c

"""The decoder-LM arms the language experiments share (one root: workdirs/lm_decoder).

`experiments/lm_hash.py`, `lm_base_routing.py`, `lm_soft_causal.py` and `lm_ec_leak.py`
compare routers in the same decoder (`configs/t5/causal_lm.py`, tiny: d 128, 4 blocks,
MoE every other block, 16 experts) trained on the same budget, so their common arms
(dense, Switch, ...) are the same runs: each arm's name here is its workdir under
`ROOT`, and the runner refuses a finished run whose config differs from its arm's.

Routers that read later tokens when training (BASE, Sinkhorn-BASE, expert choice, the
oracle 'next' hash) train with `allow_future_leak=True`; BASE and S-BASE evaluate with
their papers' causal greedy rule, expert choice with its training rule (the leak) and,
as an extra evaluation, with the causal rule `eval_rule='token_top_k'`.
"""
from __future__ import annotations

from moe_jax.experiments import presets as P

ROOT = 'workdirs/lm_decoder'
NUM_EXPERTS = 16
HASH_KINDS = ('balanced', 'random', 'dispersed', 'clustered', 'bigram', 'previous', 'position',
              'next')
TABLE_KINDS = ('balanced', 'clustered', 'dispersed')
LEAK = {'model.moe.allow_future_leak': True}
# Hash layers have no capacity (the paper drops nothing): the dropless engine runs them
# at the cost of the tokens they route (gather with C = S would cost E times more).
HASH = {'model.moe.engine': 'dropless'}



def routers(num_experts: int) -> dict[str, tuple[str, dict]]:
  """name -> (router of configs/t5/causal_lm.py, overrides) for `num_experts` experts."""
  def hash_arm(kind):
    table = ({'model.moe.router_kwargs.table_path': f'{{root}}/hash_tables/{kind}_E{num_experts}.npy'}
             if kind in TABLE_KINDS else {})
    return ('hash', {**HASH, 'model.moe.router_kwargs.kind': kind, **table,
                     **(LEAK if kind == 'next' else {})})
  return {'dense': ('dense', {}), 'switch': ('switch', {}), 'top2': ('tokens_choice', {}),
          **{f'hash_{k}': hash_arm(k) for k in HASH_KINDS},
          'base': ('base', LEAK), 'sinkhorn_base': ('sinkhorn_base', LEAK),
          'reinforce': ('reinforce', {}), 'soft_moe_causal': ('soft_moe_causal', {}),
          'ec_leaky': ('experts_choice', LEAK)}


GROUPS = {'dense': 'dense', **{f'hash_{k}': 'hash' for k in HASH_KINDS}}

# Extra evaluation of the expert-choice decoder with the causal rule.
CAUSAL_EVAL = dict(name='causal', arms=['ec_leaky'],
                   overrides={'model.moe.router_kwargs.eval_rule': 'token_top_k'})

# The budget of every decoder arm: 4096 target tokens per step (32 x 128).
STEPS = {'cpu': 600, 'smoke': 4}
EVALS = 6


def num_experts(variant: str) -> int:
  return 4 if variant == 'smoke' else NUM_EXPERTS


def hash_tables_prepare(variant: str, kinds=TABLE_KINDS) -> dict:
  """The prepare hook that builds the data-made hash tables from the dense arm."""
  return dict(fn='moe_jax.experiments.hash_tables:prepare',
              kwargs=dict(num_experts=num_experts(variant), kinds=tuple(kinds),
                          embedding_arm='dense'))


def arms(names, variant: str) -> list[dict]:
  """The arms `names` of the decoder comparisons for `variant` ('cpu' or 'smoke')."""
  e = num_experts(variant)
  schedule = (P.smoke(P.CAUSAL) if variant == 'smoke' else
              P.schedule(STEPS[variant], evals=EVALS))
  table = routers(e)
  return [P.arm(name, f'{table[name][0]},tiny',
                P.merge(schedule, {'model.moe.num_experts': e}, table[name][1]),
                group=GROUPS.get(name, name), config_file=P.CAUSAL)
          for name in names]


def experiment(name: str, variant: str | None, title: str):
  """The fields every decoder experiment shares (root, seeds, metric; see
  `presets.experiment`); the smoke variant gets its own root."""
  c = P.experiment(name, variant, title, P.CAUSAL, metric='neg_log_perplexity')
  c.root = ROOT if c.name.endswith('_cpu') else f'{ROOT}_smoke'
  return c

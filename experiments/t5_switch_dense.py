r"""Switch Transformer vs a FLOP-matched dense T5 on span corruption, 2 to 32 experts, and
top-1 vs top-2 (Fedus et al. 2022, Table 1, Fig. 4 and Fig. 5 analogue).

    python -m moe_jax.experiments.run --experiment=experiments/t5_switch_dense.py --lock=/tmp/cpu.lock
    python -m moe_jax.experiments.run --experiment=experiments/t5_switch_dense.py --dry_run

T5.1.1-style encoder-decoder `configs/t5/span_corruption.py` tiny (d 128, 2+2 blocks,
GEGLU d_ff 512, vocab 4096; inputs 128 -> targets 29, batch 32) on debian_docs. Arms:
dense; Switch (top-1, capacity 1.25 train / 2.0 eval, balancing loss 1e-2, input jitter
1e-2, every other block of both stacks: the paper's placement) with 2, 4, 8, 16 and 32
experts of the dense MLP's size (the same FLOPs per token as dense); top-2 token choice
with 8 experts (the paper's "MoE-Base": capacity 1.25 / 2.0, ~1.5x the MLP FLOPs of the
MoE blocks). STEPS steps each, evaluated EVALS times on the same validation rows; 3
paired seeds. Derived per run: `steps_to_dense` and `seconds_to_dense`, the steps and
training seconds the run needs to reach the same seed's dense run's final validation
quality (interpolated between evaluations; none when never reached), and the speed-ups
they give (dense's steps or seconds / the run's: Fig. 5's 7.5x / 7x).

Tuning budget: none; every arm uses the config file's AdamW 3e-3, 100 warm-up steps,
cosine decay to 0 at the last step, batch 32. Differences from the paper: 5M-parameter
models instead of 223M, 2 blocks per stack, 1.2M target tokens instead of 100k x 1M,
AdamW instead of Adafactor, technical English instead of C4. Expected
(lm-experiments.md §5.1): Switch better than dense by 0.03-0.1 nats at 8-16 experts,
step speed-ups 1.5-3x, monotone in experts with diminishing returns; top-1 vs top-2 at
the noise floor.

Cost: estimated with `--estimate=60` (experiments/estimates/t5_switch_dense_cpu.json, before TCMalloc): 1.3 h for 4 of its 7 arms (3 seeds each; the others train in an earlier config or were not estimated) (5–8 min per run); not run yet.

Variants: cpu (the experiment), smoke (two tiny arms, two seeds, 4 steps; the test suite).
"""
from moe_jax.experiments import presets as P

EXPERTS = (2, 4, 8, 16, 32)
STEPS, EVALS = 1200, 12


def _experts(e: int) -> dict:
  return {'model.encoder_moe.num_experts': e, 'model.decoder_moe.num_experts': e}


def get_config(variant=None):
  c = P.experiment('t5_switch_dense', variant, 'Switch vs dense T5, span corruption', P.SPAN,
                   metric='neg_log_perplexity')
  smoke = c.name.endswith('smoke')
  common = P.smoke(P.SPAN) if smoke else P.schedule(STEPS, evals=EVALS)
  arms = [P.arm('dense', 'dense,tiny', common, group='dense')]
  arms += [P.arm(f'switch_e{e}', 'switch,tiny', P.merge(common, _experts(e)), group='switch',
                 label=f'{e}E', x=e) for e in ((4,) if smoke else EXPERTS)]
  if not smoke:
    arms.append(P.arm('top2_e8', 'tokens_choice,tiny', P.merge(common, _experts(8)),
                      group='top-2', label='8E', x=8))
  c.arms = arms
  c.derived = [
      dict(name='steps_to_dense', fn='steps_to_target', kwargs=dict(reference='dense'),
           higher_is_better=False, label="steps to dense's final quality"),
      dict(name='seconds_to_dense', fn='steps_to_target',
           kwargs=dict(reference='dense', output='seconds'), higher_is_better=False,
           label="training seconds to dense's final quality"),
      dict(name='speedup_steps', fn='steps_to_target',
           kwargs=dict(reference='dense', output='speedup_steps'), higher_is_better=True,
           label='step speed-up over dense'),
      dict(name='speedup_seconds', fn='steps_to_target',
           kwargs=dict(reference='dense', output='speedup_seconds'), higher_is_better=True,
           label='wall-clock speed-up over dense'),
  ]
  if smoke:
    c.comparisons = [('switch_e4', 'dense'), ('switch_e4', 'dense', 'steps_to_dense')]
  else:
    c.comparisons = ([(f'switch_e{e}', 'dense') for e in EXPERTS] +
                     [('switch_e32', 'switch_e2'), ('switch_e8', 'switch_e2'),
                      ('top2_e8', 'switch_e8'),
                      ('switch_e8', 'dense', 'steps_to_dense'),
                      ('switch_e32', 'dense', 'steps_to_dense'),
                      ('switch_e8', 'dense', 'seconds_to_dense'),
                      ('switch_e32', 'dense', 'seconds_to_dense')])
  c.sweep = dict(x_label='experts per MoE layer',
                 panels=['metric', 'speedup_steps', 'speedup_seconds', 'step_time_s'])
  c.notes = ('No per-arm tuning: every arm uses the config file\'s AdamW 3e-3, 100 warm-up '
             'steps, cosine decay, batch 32; Switch capacity 1.25/2.0, balance loss 1e-2.')
  c.otherwise = ('5M-parameter models and 1.2M target tokens (the paper: 223M parameters, 100k '
                 'steps of C4)')
  c.claims = [
      dict(paper='Switch Transformer (Fedus et al. 2022), Table 1',
           claim='Switch (top-1) beats the FLOP-matched dense T5',
           paper_value='neg. log perplexity -1.561 (Switch-Base, 128E) vs -1.731 (T5-Base) '
                       'at 100k steps: +0.17 nats',
           comparison=('switch_e32', 'dense'), expect='a'),
      dict(paper='Switch Transformer, App. D', claim='As few as 2 experts beat dense',
           paper_value='"compelling gains" with 2 experts',
           comparison=('switch_e2', 'dense'), expect='a'),
      dict(paper='Switch Transformer, Fig. 4', claim='More experts are better at equal FLOPs',
           paper_value='monotone from 2 to 256 experts (e.g. -1.505 at 1.1B vs -1.427 at 14.7B)',
           comparison=('switch_e32', 'switch_e2'), expect='a'),
      dict(paper='Switch Transformer, Fig. 5',
           claim="Switch reaches dense's final quality in fewer steps",
           paper_value="64E reaches T5-Base's quality 7.5x faster in steps",
           comparison=('switch_e32', 'dense', 'steps_to_dense'), expect='a',
           show='speedup_steps'),
      dict(paper='Switch Transformer, Fig. 5',
           claim="Switch reaches dense's final quality in less training time",
           paper_value='7x faster in wall-clock time (TPUv3)',
           comparison=('switch_e32', 'dense', 'seconds_to_dense'), expect='a',
           show='speedup_seconds'),
      dict(paper='Switch Transformer, Table 1',
           claim='Top-2 and top-1 routing are about equal per step',
           paper_value='-1.559 (top-2, cf 1.25) vs -1.553 (top-1, cf 1.25)',
           comparison=('top2_e8', 'switch_e8'), expect=None),
  ]
  return c

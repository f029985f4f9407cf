r"""Router Pareto comparison on Fashion-MNIST (the CPU-scale analogue of Soft MoE Fig. 3).

Dense ViT vs tokens choice (k=1, k=2) vs experts choice vs Soft MoE, at two sizes, each
trained with `configs/vit/fashion_mnist.py`; test accuracy against training FLOPs, wall
time and process CPU time.

    python -m moe_jax.experiments.run --experiment=experiments/vit_pareto.py:cpu
    python -m moe_jax.experiments.run --experiment=experiments/vit_pareto.py:cpu --dry_run

Variants:
  cpu       every method at both CPU sizes on a budget that fits a 2-core machine (the
            config file's own schedule is 5000 steps): tiny for 1200 steps, small for
            600, evaluated once at the end on the full test set; seed 0 only. Measured
            cost: 10 runs, about 45 min on 2 cores. Result (seed 0): test accuracy tiny
            dense 85.75%, tokens choice k=1 85.87%, k=2 86.02%, experts choice 86.39%,
            Soft MoE 85.90%; small 83.32 / 83.50 / 83.74 / 83.65 / 83.48% (README).
  cpu_full  the config file's full schedules (5000 steps): about 10x the cost of 'cpu'.
  smoke     two tiny arms, two seeds, a few steps (the test suite runs it).
"""
import ml_collections

# method -> (router of the config file, config overrides)
METHODS = {
    'dense': ('dense', {}),
    'tokens_choice_k1': ('tokens_choice', {'model.moe.router_kwargs.k': 1}),
    'tokens_choice_k2': ('tokens_choice', {'model.moe.router_kwargs.k': 2}),
    'experts_choice': ('experts_choice', {}),
    'soft_moe': ('soft_moe', {}),
}
SIZE_OVERRIDES = {
    'cpu': {'tiny': {'num_train_steps': 1200, 'eval_every_steps': 1200},
            'small': {'num_train_steps': 600, 'eval_every_steps': 600}},
    'cpu_full': {'tiny': {}, 'small': {}},
    'smoke': {'tiny': {'num_train_steps': 4, 'optimizer.warmup_steps': 1, 'log_every_steps': 2,
                       'eval_every_steps': 4, 'model.patch_size': 7, 'model.depth': 2,
                       'model.moe.last_n': 1}},
}


def get_config(variant=None):
  variant = variant or 'cpu'
  if variant not in SIZE_OVERRIDES:
    raise ValueError(f'unknown variant {variant!r}; choose one of {sorted(SIZE_OVERRIDES)}.')
  methods = ('dense', 'soft_moe') if variant == 'smoke' else tuple(METHODS)
  c = ml_collections.ConfigDict()
  c.name = f'vit_pareto_{variant}'
  c.title = f'ViT routers on Fashion-MNIST ({variant})'
  c.config_file = 'configs/vit/fashion_mnist.py'
  c.seeds = (0, 1) if variant == 'smoke' else (0,)
  c.metric, c.metric_label, c.metric_scale = 'test_accuracy', 'test accuracy (%)', 100.0
  c.arms = [dict(name=f'{m}_{size}', config_arg=f'{METHODS[m][0]},{size}', group=m, label=size,
                 overrides={**overrides, **METHODS[m][1]})
            for size, overrides in SIZE_OVERRIDES[variant].items() for m in methods]
  c.comparisons = [(f'{m}_{size}', f'dense_{size}') for size in SIZE_OVERRIDES[variant]
                   for m in methods if m != 'dense']
  return c

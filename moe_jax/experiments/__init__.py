"""The experiment runner: an experiment config -> runs (arms x seeds) -> summary, plots.

    python -m moe_jax.experiments.run --experiment=experiments/vit_pareto.py:cpu
"""

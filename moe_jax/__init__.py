"""moe_jax: Mixture-of-Experts routing research in JAX / Flax NNX."""
__version__ = '0.1.0'

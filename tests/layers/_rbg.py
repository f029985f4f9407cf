"""Test helper: `nnx.Rngs` on the 'rbg' PRNG.

With JAX's default partitionable threefry, every new rank-3 random shape (expert
weights, Soft MoE slot parameters) costs seconds of XLA compilation on CPU; 'rbg' keys
compile in a fraction of that, which keeps these tests inside their time budget.
"""
import jax
from flax import nnx


def rngs(seed: int, **streams: int) -> nnx.Rngs:
  key = lambda s: jax.random.key(s, impl='rbg')
  return nnx.Rngs(key(seed), **{name: key(s) for name, s in streams.items()})

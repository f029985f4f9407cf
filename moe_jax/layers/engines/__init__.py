"""Engines: run the experts on the tokens a `Routing` sends them, and combine.

* `einsum`: one-hot / dense dispatch and combine einsums over `[G, S, E, C]` (the vmoe /
  flaxformer baseline); the only engine for dense (Soft MoE) routings, which every
  other engine hands to it.
* `gather`: gathers slot inputs through the slot table and gathers each token's slots
  back; allocates nothing of size S·E·C and spends no FLOPs on zeros.
* `dropless`: sorts (token, choice) pairs by expert and runs a grouped MLP; ignores
  capacity, so nothing is dropped. Routings without a token-side view go to `gather`.

All engines give the same numbers where their semantics agree (tested to 1e-5 in
float32, outputs and gradients). `einsum` and `gather` are buffer engines: the
expert-parallel code calls `dispatch(x, r) -> [E, G, C, d]` and
`combine(buf, r) -> [G, S, d]` on either side of its all_to_all. Every engine has
`apply(x, r, experts) -> [G, S, d]`.
"""
from moe_jax.layers.engines.dropless import DroplessEngine
from moe_jax.layers.engines.einsum import EinsumEngine
from moe_jax.layers.engines.gather import GatherEngine

ENGINES = {'einsum': EinsumEngine(), 'gather': GatherEngine(), 'dropless': DroplessEngine()}


def get_engine(name: str):
  if name not in ENGINES:
    raise ValueError(f'unknown engine {name!r}; choose one of {sorted(ENGINES)}.')
  return ENGINES[name]


__all__ = ['ENGINES', 'DroplessEngine', 'EinsumEngine', 'GatherEngine', 'get_engine']

"""Engines: run the experts on the tokens a `Routing` sends them, and combine.

* `einsum`: one-hot / dense dispatch and combine einsums over `[G, S, E, C]` (the vmoe /
  flaxformer baseline); the only engine for dense (Soft MoE) routings, which every
  other engine hands to it.
* `gather`: gathers slot inputs through the slot table and gathers each token's slots
  back; allocates nothing of size S·E·C and spends no FLOPs on zeros.
* `dropless`: sorts (token, choice) pairs by expert and runs a grouped MLP; ignores
  capacity, so nothing is dropped. Routings without a token-side view go to `gather`.

All engines give the same numbers where their semantics agree (tested to 1e-5 in
float32, outputs and gradients). An engine is a frozen dataclass (hashable, so a layer
holds it as static configuration); its fields are its options, set from the config's
`engine_kwargs`:

    engine = get_engine('dropless', tile=64)       # == ENGINES['dropless'](tile=64)
    layer = MoeLayer(..., engine='dropless', engine_kwargs=dict(tile=64))

Every engine has `apply(x, r, experts) -> [G, S, d]`. `einsum` and `gather` are buffer
engines (`expert_parallel = 'buffer'`): the expert-parallel code calls
`dispatch(x, r) -> [E, G, C, d]` and `combine(buf, r) -> [G, S, d]` on either side of its
all_to_all; `dropless` exchanges rows itself (`expert_parallel = 'rows'`).
"""
import dataclasses

from moe_jax.errors import ConfigError
from moe_jax.layers.engines.dropless import DroplessEngine
from moe_jax.layers.engines.einsum import EinsumEngine
from moe_jax.layers.engines.gather import GatherEngine

ENGINES = {'einsum': EinsumEngine, 'gather': GatherEngine, 'dropless': DroplessEngine}


def get_engine(name: str, **options):
  """A new engine `ENGINES[name](**options)`; ConfigError on an unknown name or option."""
  if name not in ENGINES:
    raise ConfigError(f'unknown engine {name!r}; choose one of {sorted(ENGINES)}.',
                      field='engine')
  cls = ENGINES[name]
  fields = sorted(f.name for f in dataclasses.fields(cls))
  for key in sorted(set(options) - set(fields)):
    takes = f'it takes: {", ".join(fields)}' if fields else 'it takes none'
    raise ConfigError(f'engine {name!r} has no option {key!r}; {takes}.', field=key)
  return cls(**options)


__all__ = ['ENGINES', 'DroplessEngine', 'EinsumEngine', 'GatherEngine', 'get_engine']

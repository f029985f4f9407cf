"""Communication volume of one expert-parallel MoE layer, read from the compiled program.

    python scripts/comm_volume.py --out experiments/results/comm_volume.json

Compiles the forward pass of `MoeLayer` on a (data=2, expert=4) mesh of 8 simulated
CPU devices for a grid of tokens, d, k and capacity factor (plus expert choice and
Soft MoE), reads the per-device bytes of every all_to_all from the compiled HLO and
(and the dtype-exact ones from the lowered StableHLO, since XLA:CPU upcasts bfloat16
collectives to float32 when compiling) and compares them with the formula

    bytes per all_to_all (per device) = E · G · C · d · bytes_per_element
        token choice: C = ceil(k · S · capacity_factor / E)  =>  ≈ k · cf · T · d · bytes
        expert choice: C = ceil(capacity_factor · S / E); Soft MoE: C = slots per expert

with G routing groups and T = G·S tokens per device. A fraction (n-1)/n of it leaves the
device (n = |expert|). The forward pass has 2 all_to_alls, a training step 4.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax                      # noqa: E402
import jax.numpy as jnp         # noqa: E402
from flax import nnx            # noqa: E402

from moe_jax import layers, parallel   # noqa: E402
from moe_jax.parallel import hlo_comm     # noqa: E402

E = 8


def measure(router: str, kwargs: dict, *, tokens: int, d: int, groups: int, dtype, mesh):
  with jax.set_mesh(mesh):
    layer = layers.MoeLayer(d, E, 2 * d, router=router, router_kwargs=kwargs, engine='gather',
                            dtype=dtype, rngs=nnx.Rngs(0))
    batch = groups * parallel.num_batch_shards(mesh)
    x = jax.ShapeDtypeStruct((batch, tokens, d), dtype,
                             sharding=jax.NamedSharding(mesh, parallel.batch_spec(mesh, 3)))
    lowered = jax.jit(lambda m, x: m(x)).lower(layer, x)
    hlo = lowered.compile().as_text()
  return hlo_comm.collective_bytes(hlo), hlo_comm.lowered_all_to_all_bytes(lowered.as_text())


def capacity_of(router: str, kwargs: dict, tokens: int) -> int:
  if router == 'soft_moe':
    return kwargs['num_slots']
  cf = kwargs['capacity_factor']
  k = kwargs.get('k', 1) if router == 'tokens_choice' else 1
  return math.ceil(k * tokens * cf / E)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--out', default='experiments/results/comm_volume.json')
  args = ap.parse_args()
  mesh = parallel.make_mesh(dict(data=2, expert=4))
  n_exp = parallel.mesh.axis_size(mesh, 'expert')
  grid = []
  for tokens in (16, 64):
    for d in (32, 128):
      for k, cf in ((1, 1.0), (1, 1.25), (2, 1.25), (2, 2.0)):
        grid.append(('tokens_choice', dict(k=k, capacity_factor=cf), tokens, d, jnp.float32))
  grid += [('tokens_choice', dict(k=2, capacity_factor=1.25), 64, 128, jnp.bfloat16),
           ('experts_choice', dict(capacity_factor=2.0), 64, 128, jnp.float32),
           ('soft_moe', dict(num_slots=4), 64, 128, jnp.float32)]
  rows = []
  groups = 2
  for router, kwargs, tokens, d, dtype in grid:
    got, lowered = measure(router, kwargs, tokens=tokens, d=d, groups=groups, dtype=dtype,
                           mesh=mesh)
    a2a = got.get('all-to-all', [])
    elem = jnp.dtype(dtype).itemsize
    capacity = capacity_of(router, kwargs, tokens)
    formula = hlo_comm.all_to_all_bytes(groups=groups, num_experts=E, capacity=capacity,
                                        d_model=d, dtype_bytes=elem)
    # XLA:CPU upcasts 16-bit collectives to float32 when compiling (GPU/TPU do not).
    compiled_formula = formula * (4 // elem if jax.default_backend() == 'cpu' else 1)
    row = dict(router=router, **kwargs, tokens_per_group=tokens, groups_per_device=groups,
               tokens_per_device=groups * tokens, d=d, dtype=jnp.dtype(dtype).name,
               num_experts=E, expert_axis=n_exp, capacity=capacity,
               all_to_all_count_forward=len(a2a), bytes_per_all_to_all_compiled=a2a,
               bytes_per_all_to_all_lowered=lowered, bytes_per_all_to_all_formula=formula,
               bytes_leaving_device_per_all_to_all=formula * (n_exp - 1) // n_exp,
               all_gather_count=len(got.get('all-gather', [])),
               matches=(a2a == [compiled_formula] * 2 and lowered == [formula] * 2))
    rows.append(row)
    print(f"{router:14s} S={tokens:3d} d={d:3d} k={kwargs.get('k', '-')} "
          f"cf={kwargs.get('capacity_factor', '-')} P={kwargs.get('num_slots', '-')} "
          f"{row['dtype']:8s} C={capacity:3d}: compiled {a2a} lowered {lowered} formula {formula} "
          f"{'OK' if row['matches'] else 'MISMATCH'}")
  result = dict(device=f'{jax.device_count()} simulated CPU devices', jax=jax.__version__,
                mesh=dict(zip(mesh.axis_names, mesh.axis_sizes)),
                command='python scripts/comm_volume.py', rows=rows)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  print('wrote', args.out, '| all match:', all(r['matches'] for r in rows))


if __name__ == '__main__':
  main()

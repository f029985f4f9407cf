"""Time BASE's exact balanced assignment against S-BASE's Sinkhorn and greedy top-1.

    python scripts/bench_base_sinkhorn.py [out.json]

Writes {shape: {base_ms, sinkhorn_ms, greedy_ms}} (mean of 5 jitted calls after warm-up).
Compare ratios measured in one run, not absolute times across machines.
"""
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.routing import base_layers, sinkhorn

SHAPES = [(128, 48, 8), (8, 392, 8), (16, 256, 32)]     # [G, S, E]


def timed(fn, a, reps=5):
  jax.block_until_ready(fn(a))
  t = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(fn(a))
  return round((time.perf_counter() - t) / reps * 1e3, 2)


def main():
  fns = dict(base_ms=jax.jit(base_layers.balanced_assignment),
             sinkhorn_ms=jax.jit(lambda l: sinkhorn.sinkhorn_potentials(l)[1]),
             greedy_ms=jax.jit(lambda l: jnp.argmax(l, -1)))
  out = {'device': str(jax.devices()[0])}
  for g, s, e in SHAPES:
    a = jnp.asarray(np.random.default_rng(0).normal(size=(g, s, e)).astype(np.float32))
    out[f'G{g}_S{s}_E{e}'] = {name: timed(fn, a) for name, fn in fns.items()}
  text = json.dumps(out, indent=1)
  print(text)
  if len(sys.argv) > 1:
    with open(sys.argv[1], 'w') as f:
      f.write(text)


if __name__ == '__main__':
  main()

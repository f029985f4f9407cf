"""Shared helpers of the routing tests: one jit per (function, options), and the
combine weights of a slot table rebuilt in numpy."""
import jax
import numpy as np

_JITTED = {}


def run(fn, *arrays, **options):
  """fn(*arrays, **options) compiled once per options (eager JAX compiles op by op,
  which is far slower on a loaded CPU)."""
  key = (fn, tuple(sorted(options.items())))
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda *a: fn(*a, **options))
  return _JITTED[key](*arrays)


def combine_of(r):
  """[G, S, E] combine weights from the slot table, in numpy."""
  slot_token, slot_weight = np.asarray(r.slot_token), np.asarray(r.slot_weight)
  g, e, _ = slot_token.shape
  out = np.zeros((g, r.num_tokens + 1, e))
  for gi in range(g):
    for ei in range(e):
      out[gi, slot_token[gi, ei], ei] += slot_weight[gi, ei]
  return out[:, :-1]

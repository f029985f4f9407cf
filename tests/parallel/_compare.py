"""Helpers shared by the check scripts (`checks_*.py`): one device vs a mesh, tolerances,
expected errors. Imported inside the subprocesses `_harness.run_script` starts."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax import parallel

TOL = 1e-5


def loss(model, x, t):
  """A scalar that reaches every output, aux loss and parameter: Σ y·t + aux losses."""
  y, aux = model(x)
  return jnp.sum(y * t) + sum(aux['losses'].values()), (y, aux)


grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def close(name, a, b, tol=TOL):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (name, a.shape, b.shape)
  err = np.max(np.abs(a - b) / (1.0 + np.abs(b))) if a.size else 0.0
  assert err <= tol, f'{name}: max relative error {err:.3g} > {tol}'


def raises(fn, *words):
  """`fn()` raises a ValueError whose message holds every word."""
  try:
    fn()
  except ValueError as e:
    msg = str(e)
    assert all(w in msg for w in words), f'error lacks {words}: {msg}'
    return
  raise AssertionError(f'no ValueError (expected one mentioning {words})')


def one_device_then_mesh(layer, x, t, mesh_cfg):
  """`grad_fn` of `loss` on one device (no mesh), then with the layer sharded over the
  mesh `mesh_cfg` and the batch split over its batch axes.

  Returns (reference, sharded, mesh); each result is ((loss, (y, aux)), (model grads, x grad)).
  """
  ref = grad_fn(layer, x, t)
  mesh = parallel.make_mesh(mesh_cfg)
  with jax.set_mesh(mesh):
    parallel.shard_module(layer, mesh)
    xs, ts = parallel.shard_batch((np.asarray(x), np.asarray(t)), mesh)
    got = grad_fn(layer, xs, ts)
  return ref, got, mesh


def assert_same_results(got, ref):
  """Loss, output, every aux loss and metric, the input's and every parameter's gradient."""
  (l1, (y1, a1)), (gm1, gx1) = got
  (l0, (y0, a0)), (gm0, gx0) = ref
  close('loss', l1, l0)
  close('y', y1, y0)
  assert set(a1['losses']) == set(a0['losses']) and set(a1['metrics']) == set(a0['metrics'])
  for k in a0['losses']:
    close(f'aux loss {k}', a1['losses'][k], a0['losses'][k])
  for k in a0['metrics']:
    close(f'metric {k}', a1['metrics'][k], a0['metrics'][k])
  close('grad x', gx1, gx0)
  g0 = nnx.state(gm0).flat_state()
  g1 = dict(nnx.state(gm1).flat_state())
  assert len(g0) >= 3
  for path, v in g0:
    close(f'grad {"/".join(map(str, path))}', g1[path][...], v[...])

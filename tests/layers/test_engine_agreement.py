"""Every engine gives the same layer on every router of `ROUTERS`: outputs and gradients
(w.r.t. x, router params and expert params) agree to 1e-5 in float32.

One case per registry entry, with router_kwargs that drop nothing, so that the dropless
engine (which ignores capacity) must agree too; `tokens_choice_drops` adds a routing
that drops over a fifth of the choices, where einsum and gather must still agree
(dropless differs there by design: `test_engines.test_dropless_engine_ignores_capacity`).
Each case is one jit with the routing computed from the same router state for every
engine, so random routers (noise, shuffles, sampling) draw the same randomness.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import layers

jit = functools.partial(jax.jit, compiler_options=dict(xla_backend_optimization_level=0,
                                                       xla_cpu_use_fusion_emitters=False))
B, S, D, E, H = 2, 8, 8, 4, 16
TOL = dict(rtol=1e-5, atol=1e-5)
ALL = tuple(layers.ENGINES)
BUFFER = ('einsum', 'gather')

# name -> (router, router_kwargs, engines). Capacity factors of E (C = S·k or more)
# leave token-choice routers nothing to drop.
CASES = {
    'tokens_choice': ('tokens_choice', dict(k=2, capacity_factor=E, z_loss_weight=1e-3), ALL),
    'tokens_choice_drops': ('tokens_choice', dict(k=2, capacity_factor=0.5), BUFFER),
    'experts_choice': ('experts_choice', dict(capacity_factor=1.0), ALL),
    'soft_moe': ('soft_moe', dict(num_slots=2), ALL),
    'hash': ('hash', dict(kind='multihash', num_hashes=2, seed=5), ALL),
    'base': ('base', {}, ALL),
    'sinkhorn_base': ('sinkhorn_base', {}, ALL),
    'noisy_top_k': ('noisy_top_k', dict(k=2), ALL),
    'gshard_top2': ('gshard_top2', dict(capacity_factor=E), ALL),
    'switch': ('switch', dict(capacity_factor=E, jitter_eps=0.1), ALL),
    'straight_through': ('straight_through', dict(capacity_factor=E), ALL),
    'deepseek': ('deepseek', dict(k=2), ALL),
    'dselect_k': ('dselect_k', {}, ALL),
    'experts_choice_capped': ('experts_choice_capped',
                              dict(max_experts_per_token=3, num_iters=20), ALL),
    'reinforce': ('reinforce', dict(k=2, capacity_factor=E), ALL),
    'soft_moe_causal': ('soft_moe_causal', dict(slots_per_position=2), ALL),
}


def test_every_registered_router_has_a_case():
  assert set(layers.ROUTERS) <= {router for router, _, _ in CASES.values()}


def run_engines(layer, engine_names, x, ids, target):
  """One jit: engine -> (loss, y, (param grads, x grad)), plus the routing metrics."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(engine, params, x, ids):
    # Same router state (and RNG) for every engine; copied so that it belongs to this trace.
    model = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))
    model.engine = layers.get_engine(engine)
    y, aux = model(x, token_ids=ids)
    return jnp.sum(y * target) + sum(aux['losses'].values()), (y, aux['metrics'])

  @jit
  def f(params, x, ids):
    out = {}
    for engine in engine_names:
      (value, (y, metrics)), grads = jax.value_and_grad(
          functools.partial(loss, engine), argnums=(0, 1), has_aux=True)(params, x, ids)
      out[engine] = (value, y, grads)
    return out, metrics
  return f(params, x, ids)


@pytest.mark.parametrize('case', list(CASES))
def test_engines_agree_on_outputs_and_gradients(case):
  router, kwargs, engine_names = CASES[case]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, S, D)).astype(np.float32)
  ids = jnp.asarray(rng.integers(0, 50, size=(B, S)), jnp.int32)
  target = rng.normal(size=(B, S, D)).astype(np.float32)
  layer = layers.MoeLayer(D, E, H, router=router, router_kwargs=kwargs, rngs=nnx.Rngs(0))
  # Non-zero biases, so padding rows and empty slots would show if they leaked.
  layer.experts.b_in[...] = 0.1 * jax.random.normal(jax.random.key(2), (E, H))
  layer.experts.b_out[...] = 0.1 * jax.random.normal(jax.random.key(3), (E, D))
  results, metrics = run_engines(layer, engine_names, x, ids, target)
  dropped = float(metrics['dropped_fraction'])
  if case.endswith('drops'):
    assert dropped > 0.2, dropped      # the comparison covers dropped tokens
  elif 'dropless' in engine_names:
    assert dropped == 0.0, dropped     # else dropless would rightly differ
  ref_loss, ref_y, ref_grads = results.pop('einsum')
  assert float(jnp.max(jnp.abs(ref_grads[1]))) > 0
  for engine, (value, y, grads) in results.items():
    np.testing.assert_allclose(value, ref_loss, rtol=1e-5, err_msg=engine)
    np.testing.assert_allclose(y, ref_y, err_msg=engine, **TOL)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
    flat_got = jax.tree_util.tree_leaves_with_path(grads)
    assert [p for p, _ in flat_got] == [p for p, _ in flat_ref]
    for (path, g_ref), (_, g) in zip(flat_ref, flat_got):
      np.testing.assert_allclose(g, g_ref, err_msg=f'{engine} {jax.tree_util.keystr(path)}',
                                 **TOL)

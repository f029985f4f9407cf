"""Engines agree with a numpy reference and with each other (outputs and gradients).

The reference runs every (token, choice) through its expert's MLP in numpy, written
from the definition y[t] = Σ_(e, c) holding t slot_weight · MLP_e(x[t]), not from engine code.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import layers, routing
from moe_jax.layers import engines
from moe_jax.layers.engines import grouped

TOL = dict(rtol=1e-5, atol=1e-5)
G, S, D, H, E = 2, 12, 8, 16, 4


def np_gelu(v):
  # tanh approximation: jax.nn.gelu's default
  return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))


def np_expert(p, e, v):
  """MLP of expert e on rows v [n, d] (numpy, float64)."""
  h = np_gelu(v @ p['w_in'][e] + p['b_in'][e])
  return h @ p['w_out'][e] + p['b_out'][e]


def np_reference(p, x, slot_token, slot_weight):
  """y[g, s] = Σ over slots (e, c) with slot_token == s of slot_weight · MLP_e(x[g, s])."""
  y = np.zeros_like(x)
  g_, e_, c_ = slot_token.shape
  for g in range(g_):
    for e in range(e_):
      for c in range(c_):
        s = slot_token[g, e, c]
        if s < x.shape[1]:
          y[g, s] += slot_weight[g, e, c] * np_expert(p, e, x[g, s][None])[0]
  return y


def np_params(experts):
  p = {k: np.asarray(v, np.float64) for k, v in experts.params_dict().items()}
  return p


ROUTERS = {
    # C=5, so 2 groups x 5 slots = 10 buffer rows per expert: blocks of 4 need 2 padding rows.
    'top2_drops': ('tokens_choice', dict(k=2, capacity=5)),
    'top1_nodrop': ('tokens_choice', dict(k=1, capacity_factor=float(E))),
    'experts_choice': ('experts_choice', dict(capacity_factor=2.0)),
    'soft_moe': ('soft_moe', dict(num_slots=3)),
}
ALL_ENGINES = dict({name: cls() for name, cls in engines.ENGINES.items()},
                   gather_batched=engines.GatherEngine(experts_impl='batched'),
                   gather_tile4=engines.GatherEngine(experts_impl='blocks', max_tile=4))
# Engines whose semantics match the router's. dropless ignores capacity, so it agrees
# with the others only where nothing is dropped (`dropless_ignores_capacity` below);
# on routings without a token-side view it hands over to gather / einsum.
ENGINES_FOR = {
    'top2_drops': ('einsum', 'gather_tile4'),
    'top1_nodrop': ('einsum', 'gather', 'dropless'),
    'experts_choice': ('einsum', 'gather', 'dropless'),
    'soft_moe': ('einsum', 'gather', 'dropless'),
}
# Variants that differ from `gather` only where plain autodiff differentiates them
# (batched einsum experts): outputs only, to save compile time.
FORWARD_ONLY = {'top2_drops': ('gather_batched', 'dropless')}


def values_and_grads(layer, names, forward_names, x):
  """One jit for all engines: name -> (y, (param grads, x grad)) or (y, None)."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  ct = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)

  def loss(name, params, x):
    model = nnx.merge(graphdef, params, rest)
    y = ALL_ENGINES[name].apply(x, model.router(x), model.experts)
    return jnp.sum(y * ct), y

  @jax.jit
  def f(params, x):
    out = {'routing': nnx.merge(graphdef, params, rest).router(x)}
    for name in names:
      (_, y), grads = jax.value_and_grad(functools.partial(loss, name), argnums=(0, 1),
                                         has_aux=True)(params, x)
      out[name] = (y, grads)
    for name in forward_names:
      out[name] = (loss(name, params, x)[1], None)
    return out
  return f(params, x)


def make_layer(router, kw):
  layer = layers.MoeLayer(D, E, H, router=router, router_kwargs=kw, engine='einsum',
                          rngs=nnx.Rngs(1))
  # Non-zero biases, so padding rows and empty slots would show if they leaked.
  layer.experts.b_in[...] = 0.1 * jax.random.normal(jax.random.key(2), (E, H))
  layer.experts.b_out[...] = 0.1 * jax.random.normal(jax.random.key(3), (E, D))
  return layer


@pytest.fixture(scope='module')
def x():
  return jax.random.normal(jax.random.key(0), (G, S, D), jnp.float32)


@pytest.fixture(scope='module')
def results(x):
  """name -> (layer, routing, engine -> (y, grads or None)); computed once for the module."""
  out = {}
  for name, (router, kw) in ROUTERS.items():
    layer = make_layer(router, kw)
    by_engine = values_and_grads(layer, ENGINES_FOR[name], FORWARD_ONLY.get(name, ()), x)
    r = by_engine.pop('routing')
    dropless_on_drops = by_engine.pop('dropless') if name == 'top2_drops' else None
    out[name] = (layer, r, by_engine, dropless_on_drops)
  return out


@pytest.mark.parametrize('name', [n for n in ROUTERS if n != 'soft_moe'])
def test_sparse_routings_match_numpy_reference(results, x, name):
  layer, r, by_engine, _ = results[name]
  ref = np_reference(np_params(layer.experts), np.asarray(x, np.float64),
                     np.asarray(r.slot_token), np.asarray(r.slot_weight, np.float64))
  for eng, (y, _) in by_engine.items():
    np.testing.assert_allclose(np.asarray(y), ref, err_msg=eng, **TOL)


def test_soft_moe_matches_numpy_reference(results, x):
  layer, r, by_engine, _ = results['soft_moe']
  p, xn = np_params(layer.experts), np.asarray(x, np.float64)
  disp, comb = (np.asarray(a, np.float64) for a in r.dense())          # [G, S, E, P]
  slots = np.einsum('gsep,gsd->gepd', disp, xn)
  out = np.stack([np.stack([np_expert(p, e, slots[g, e]) for e in range(E)]) for g in range(G)])
  ref = np.einsum('gsep,gepd->gsd', comb, out)
  for eng, (y, _) in by_engine.items():
    np.testing.assert_allclose(np.asarray(y), ref, err_msg=eng, **TOL)


@pytest.mark.parametrize('name', list(ROUTERS))
def test_engines_same_outputs_and_gradients(results, name):
  _, _, by_engine, _ = results[name]
  ref_y, ref_grads = by_engine['einsum']
  for eng, (y, grads) in by_engine.items():
    np.testing.assert_allclose(y, ref_y, err_msg=eng, **TOL)
    if grads is None:
      continue
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
    for (path, g_ref), g in zip(flat_ref, jax.tree.leaves(grads)):
      np.testing.assert_allclose(g, g_ref, err_msg=f'{eng} {jax.tree_util.keystr(path)}', **TOL)


def test_gradients_reach_router_and_inputs(results):
  _, _, by_engine, _ = results['top1_nodrop']
  for eng, (_, (gp, gx)) in by_engine.items():
    assert float(jnp.max(jnp.abs(gp['router']['gate']['kernel'][...]))) > 0, eng
    assert float(jnp.max(jnp.abs(gx))) > 0, eng


def test_dropless_engine_ignores_capacity(results, x):
  """Where capacity drops choices, dropless still processes every one of them."""
  layer, r, _, (y, _) = results['top2_drops']
  assert float(r.metrics['dropped_fraction']) > 0.05
  p, xn = np_params(layer.experts), np.asarray(x, np.float64)
  te, tw = np.asarray(r.token_expert), np.asarray(r.token_weight, np.float64)
  ref = np.zeros_like(xn)
  for g in range(G):
    for s in range(S):
      for k in range(te.shape[-1]):
        ref[g, s] += tw[g, s, k] * np_expert(p, te[g, s, k], xn[g, s][None])[0]
  np.testing.assert_allclose(np.asarray(y), ref, **TOL)


def test_moe_layer_runs_every_engine(x):
  layer = make_layer('tokens_choice', dict(k=2))
  layer.engine = engines.get_engine('dropless', tile=4)
  assert layer.engine_name == 'dropless' and layer.engine.tile == 4
  assert nnx.jit(lambda m, x: m(x)[0])(layer, x).shape == x.shape
  for name in engines.ENGINES:
    built = nnx.eval_shape(lambda: layers.MoeLayer(D, E, H, engine=name, rngs=nnx.Rngs(1)))
    assert built.engine == engines.ENGINES[name]() and built.engine_name == name
  built = nnx.eval_shape(lambda: layers.MoeLayer(D, E, H, engine='dropless', rngs=nnx.Rngs(1),
                                                 engine_kwargs=dict(impl='blocks', tile=8)))
  assert built.engine == engines.DroplessEngine(impl='blocks', tile=8)
  # Engines are configuration: equal options, equal (hashable) engines, one graph.
  assert hash(built.engine) == hash(engines.DroplessEngine(impl='blocks', tile=8))
  with pytest.raises(ValueError, match='unknown engine'):
    nnx.eval_shape(lambda: layers.MoeLayer(D, E, H, engine='magic', rngs=nnx.Rngs(1)))


@pytest.mark.parametrize('k,impl,tile', [(2, 'blocks', 4), (1, 'ragged', None)])
def test_dropless_maximally_unbalanced(k, impl, tile):
  """Every token picks the same k experts: nothing is dropped, and outputs and gradients
  match autodiff of a per-token reference."""
  experts = layers.Experts(E, D, H, rngs=nnx.Rngs(0))
  experts.b_in[...] = 0.1 * jnp.ones((E, H))
  graphdef, params = nnx.split(experts, nnx.Param)
  x = jax.random.normal(jax.random.key(5), (G, S, D), jnp.float32)
  logits = jnp.zeros((G, S, E)).at[..., 1].set(20.0).at[..., 3].set(10.0)
  r = jax.jit(functools.partial(routing.tokens_choice, k=k, capacity_factor=1.0))(logits)
  assert float(r.metrics['dropped_fraction']) >= 0.5          # capacity would drop half+
  eng = engines.DroplessEngine(impl=impl, tile=tile)

  def run(params, x, w):
    return eng.apply(x, r.replace(token_weight=w), nnx.merge(graphdef, params))

  def reference(params, x, w):
    p = nnx.merge(graphdef, params).params_dict()
    y = 0.0
    for j in range(k):
      e = r.token_expert[..., j]                                   # [G, S]
      h = jax.nn.gelu(jnp.einsum('gsd,gsdh->gsh', x, p['w_in'][e]) + p['b_in'][e])
      y = y + w[..., j, None] * (jnp.einsum('gsh,gshd->gsd', h, p['w_out'][e]) + p['b_out'][e])
    return y

  ct = jax.random.normal(jax.random.key(6), x.shape)

  @jax.jit
  def both(params, x, w):
    return [jax.value_and_grad(lambda *a: jnp.sum(f(*a) * ct), argnums=(0, 1, 2))(params, x, w)
            for f in (run, reference)] + [run(params, x, w)]
  got, want, y = both(params, x, r.token_weight)
  assert bool(jnp.all(jnp.any(y != 0, axis=-1)))               # every token got its output
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize('glu,bias,act,tile,min_tile', [(True, False, 'silu', 8, 2),
                                                      (False, True, 'gelu', 8, 2),
                                                      (False, True, 'gelu', 32, 1)])
def test_grouped_mlp_blocks_and_ragged_match_reference(glu, bias, act, tile, min_tile):
  """Groups of sizes 0, 1, tile, tile+1, every remainder and most rows, then rows no
  expert owns (inf: they must not leak into any output or gradient); all three give
  one answer. tile/min_tile = 32 remainder heights: nested chains of conditionals."""
  d, h = 5, 7
  sizes = np.array([0, 1, 8, 9, 23, 7, 3], np.int32)       # 23 = 2·8 + 4 + 2 + 1
  e, n = len(sizes), int(sizes.sum())
  experts = layers.Experts(e, d, h, activation=act, glu=glu, use_bias=bias, rngs=nnx.Rngs(3))
  if bias:
    experts.b_in[...] = 0.3 * jnp.ones((e, h))
  params = experts.params_dict()
  x = jax.random.normal(jax.random.key(4), (n, d))
  owner = np.repeat(np.arange(e), sizes)

  def blocks(p, x):
    xp = jnp.concatenate([x, jnp.full((3, d), jnp.inf)])
    return experts.apply_grouped(p, xp, jnp.asarray(sizes), impl='blocks', tile=tile,
                                 min_tile=min_tile)[:n]

  def ragged(p, x):
    return experts.apply_grouped(p, x, jnp.asarray(sizes), impl='ragged')

  def reference(p, x):   # per-row expert weights, plain autodiff
    return experts.apply_weights(jax.tree.map(lambda w: w[owner], p), x[:, None, :])[:, 0]

  ct = jax.random.normal(jax.random.key(7), (n, d))

  @jax.jit
  def all_three(p, x):
    return [jax.value_and_grad(lambda p, x: jnp.sum(fn(p, x) * ct), argnums=(0, 1))(p, x)
            for fn in (reference, blocks, ragged)]
  want, *got = all_three(params, x)
  for name, g in zip(('blocks', 'ragged'), got):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, err_msg=name, **TOL)


def test_gather_rows_gradient_matches_take():
  from moe_jax.layers.engines.rows import gather_rows
  x = jax.random.normal(jax.random.key(0), (5, 3))
  idx = jnp.array([4, 0, 5, 4, 2, 5], jnp.int32)              # 5 = empty
  inverse = jnp.array([[1, 6], [6, 6], [4, 6], [6, 6], [0, 3]], jnp.int32)
  ct = jax.random.normal(jax.random.key(1), (6, 3))
  got = jax.grad(lambda x: jnp.sum(gather_rows(x, idx, inverse) * ct))(x)
  want = jax.grad(lambda x: jnp.sum(jnp.take(x, idx, axis=0, mode='fill', fill_value=0) * ct))(x)
  np.testing.assert_allclose(got, want, **TOL)


def test_errors_are_clear():
  with pytest.raises(ValueError, match='unknown engine'):
    engines.get_engine('magic')
  with pytest.raises(ValueError, match='impl must be one of'):
    engines.DroplessEngine(impl='fast')
  with pytest.raises(ValueError, match="impl must be 'auto', 'ragged'"):
    engines.DroplessEngine(exchange='fast')
  with pytest.raises(ValueError, match="experts_impl must be 'auto', 'batched' or 'blocks'"):
    engines.GatherEngine(experts_impl='fast')
  with pytest.raises(ValueError, match="engine 'gather' has no option 'combine'; it takes: "
                                       "experts_impl, max_tile, min_tile"):
    engines.get_engine('gather', combine='scatter')
  with pytest.raises(NotImplementedError, match='engine="gather"'):
    engines.get_engine('dropless').dispatch(jnp.zeros((1, 2, 3)), None)
  with pytest.raises(ValueError, match='powers of two'):
    grouped.grouped_mlp(dict(w_in=jnp.zeros((2, 3, 4)), w_out=jnp.zeros((2, 4, 3))),
                        jnp.zeros((10, 3)), jnp.array([4, 6]), impl='blocks', tile=6)
  with pytest.raises(ValueError, match='min_tile must be a power of two'):
    engines.DroplessEngine(min_tile=3)


def test_bfloat16_engines_agree_with_float32_to_bf16_precision(x):
  """bf16 experts (matmuls accumulated in float32 on CPU) give the float32 layer's
  outputs and gradients to bf16 precision, on every engine."""
  def run(dtype, engine):
    layer = make_layer('tokens_choice', dict(k=2, capacity_factor=float(E)))
    layer.experts.dtype = dtype
    layer.engine = engines.get_engine(engine)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x):
      y, _ = nnx.merge(graphdef, params, rest)(x)
      return jnp.sum(y.astype(jnp.float32) * jnp.cos(x))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

  want = run(None, 'einsum')
  for engine in engines.ENGINES:
    got = run(jnp.bfloat16, engine)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      scale = float(jnp.max(jnp.abs(b))) + 1e-6
      assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))) <= 3e-2 * scale, engine

"""Shardings, compiled collectives, global statistics, clear errors, ragged exchange.

Run by test_expert_parallel.py in a subprocess with 8 simulated CPU devices.
"""
import math
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from moe_jax import layers, parallel, routing
from moe_jax.parallel import hlo_comm, ragged
from tests.parallel._compare import raises
from tests.parallel._harness import run_checks

D, E, H = 16, 8, 32


def _layer(**kw):
  kw = dict(dict(router='tokens_choice', router_kwargs=dict(k=2), engine='gather'), **kw)
  return layers.MoeLayer(D, kw.pop('num_experts', E), kw.pop('expert_hidden', H),
                         rngs=nnx.Rngs(0), **kw)


def check_compiled_all_to_all_no_weight_all_gather():
  mesh = parallel.make_mesh(dict(data=2, expert=4))
  b, s = 16, 8
  with jax.set_mesh(mesh):
    layer = _layer()
    x = parallel.shard_batch(np.ones((b, s, D), np.float32), mesh)
    fwd = hlo_comm.collective_bytes(jax.jit(lambda m, x: m(x)).lower(layer, x).compile().as_text())

    def loss(m, x):
      y, aux = m(x)
      return jnp.sum(y) + sum(aux['losses'].values())
    bwd = hlo_comm.collective_bytes(
        jax.jit(jax.grad(loss, argnums=(0, 1))).lower(layer, x).compile().as_text())
  capacity = math.ceil(2 * s * 1.25 / E)                      # k=2, default capacity_factor
  expected = hlo_comm.all_to_all_bytes(groups=b // 8, num_experts=E, capacity=capacity, d_model=D)
  assert fwd.get('all-to-all') == [expected] * 2, (fwd, expected)      # dispatch + return
  assert len(bwd.get('all-to-all', [])) == 4, bwd                       # and their transposes
  for prog in (fwd, bwd):
    assert 'all-gather' not in prog, prog
  # The only all-reduces of the backward pass are gradient sums: the router's (replicated
  # over all 8 devices) and the local experts' (replicated over 'data'); never weights.
  local_expert_bytes = sum(v.size // 4 * 4 for v in layer.experts.params_dict().values())
  assert sum(bwd['all-reduce']) <= local_expert_bytes + D * E * 4 + 1024, bwd


def check_each_device_holds_its_experts():
  for cfg, parts in ((dict(data=2, expert=4), 4), (dict(data=2, expert=2, model=2), 4)):
    mesh = parallel.make_mesh(cfg)
    with jax.set_mesh(mesh):
      layer = _layer(glu=True)                       # built under the mesh: born sharded
    n_exp = cfg['expert']
    for name, v in layer.experts.params_dict().items():
      for shard in v.addressable_shards:
        assert shard.data.shape[0] == E // n_exp, (name, shard.data.shape)
        assert shard.data.size == v.size // parts or (name == 'b_out' and
                                                      shard.data.size == v.size // n_exp), name
    kernel = layer.router.gate.kernel[...]
    assert all(s.data.shape == kernel.shape for s in kernel.addressable_shards)
    # Optimizer states inherit the annotation.
    opt = nnx.Optimizer(layer, optax.adam(1e-3), wrt=nnx.Param)
    mu = opt.opt_state[0].mu['experts']['w_in'][...]
    assert mu.sharding.spec == P('expert', None, 'model' if cfg.get('model') else None), mu.sharding


def check_shard_module_and_specs():
  layer = _layer()                                   # no mesh: plain arrays
  assert len(layer.experts.w_in[...].sharding.device_set) == 1
  mesh = parallel.make_mesh(dict(data=2, expert=4))
  specs = parallel.partition_specs(layer, mesh)
  assert specs['experts']['w_in'].get_value() == P('expert', None, None)
  assert specs['router']['gate']['kernel'].get_value() == P()
  parallel.shard_module(layer, mesh)
  assert layer.experts.w_out[...].sharding.spec == P('expert', None, None)
  # A mesh without a 'model' axis is fine: that part of the annotation is dropped.
  other = jax.make_mesh((8,), ('expert',))
  spec = parallel.partition_specs(layer, other)['experts']['w_in'].get_value()
  assert spec == P('expert', None, None), spec


def check_restore_onto_different_mesh():
  import orbax.checkpoint as ocp
  mesh_a = parallel.make_mesh(dict(data=2, expert=4))
  with jax.set_mesh(mesh_a):
    layer = _layer()
    opt = nnx.Optimizer(layer, optax.adam(1e-3), wrt=nnx.Param)
  state = dict(model=nnx.state(layer), opt=nnx.state(opt))
  saved = jax.tree.map(np.asarray, state)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'ckpt')
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, state)
    ckpt.wait_until_finished()
    # Restore onto data=1 x expert=8 from abstract (never materialised) model and optimizer.
    mesh_b = parallel.make_mesh(dict(data=1, expert=8))
    abstract_layer = nnx.eval_shape(_layer)
    abstract_opt = nnx.eval_shape(lambda: nnx.Optimizer(_layer(), optax.adam(1e-3), wrt=nnx.Param))
    target = dict(model=parallel.abstract_state(abstract_layer, mesh_b),
                  opt=parallel.abstract_state(abstract_opt, mesh_b))
    restored = ckpt.restore(path, target)
  mu = restored['opt']['opt_state'][0]['mu']['experts']['w_in'][...]
  assert mu.sharding.spec == P('expert', None, None), mu.sharding
  w = restored['model']['experts']['w_in'][...]
  assert w.sharding.mesh.shape['expert'] == 8 and w.sharding.spec == P('expert', None, None)
  assert all(s.data.shape[0] == 1 for s in w.addressable_shards)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), restored, saved)


def check_layer_inside_a_user_shard_map():
  # A fully manual step (shard_map over the whole loss): the layer runs its body directly.
  layer = _layer()
  x = jax.random.normal(jax.random.key(7), (8, 6, D))

  def loss(model, x):
    y, aux = model(x)
    return parallel.global_mean(jnp.mean(y ** 2)) + sum(aux['losses'].values())
  ref = jax.jit(jax.value_and_grad(loss))(layer, x)
  mesh = parallel.make_mesh(dict(data=2, expert=4))
  with jax.set_mesh(mesh):
    parallel.shard_module(layer, mesh)
    graphdef, state = nnx.split(layer)
    specs = parallel.partition_specs(state, mesh)
    step = jax.jit(jax.shard_map(
        lambda st, x: jax.value_and_grad(lambda s: loss(nnx.merge(graphdef, s), x))(st),
        in_specs=(specs, P(('data', 'expert'))), out_specs=(P(), specs)))
    got = step(state, parallel.shard_batch(np.asarray(x), mesh))
  np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                       atol=1e-5), got[1], nnx.state(ref[1]))


def check_clear_errors():
  mesh = parallel.make_mesh(dict(data=2, expert=4))
  with jax.set_mesh(mesh):
    raises(lambda: _layer(num_experts=6), 'does not divide', "'expert'", 'num_experts')
    layer = _layer()
    raises(lambda: layer(jnp.ones((6, 4, D))), 'batch of 6', 'multiple of 8')
    raises(lambda: parallel.shard_batch(np.ones((6, 4)), mesh), '6 examples', 'multiple of 8')
  unsharded = _layer(num_experts=6)
  with jax.set_mesh(mesh):
    raises(lambda: unsharded(jnp.ones((8, 4, D))), 'num_experts=6', 'config.mesh.expert')
  with jax.set_mesh(parallel.make_mesh(dict(data=1, expert=2, model=4))):
    raises(lambda: _layer(expert_hidden=6), 'does not divide', "'model'")
  raises(lambda: parallel.make_mesh(dict(data=2, expert=2)), 'needs 4 devices', '8 are available')
  raises(lambda: parallel.make_mesh(dict(data=3, expert=-1)), 'does not divide the 8')


def check_global_mean_and_sum():
  mesh = parallel.make_mesh(dict(data=2, expert=4))
  x = np.arange(16, dtype=np.float32).reshape(16, 1)
  np.testing.assert_array_equal(parallel.global_mean(x), x)     # outside shard_map: identity

  def body(v):
    assert parallel.batch_axes_in_context() == ('data', 'expert')
    return parallel.global_mean(jnp.mean(v)), parallel.global_sum(jnp.sum(v))
  with jax.set_mesh(mesh):
    mean, total = jax.shard_map(body, in_specs=P(('data', 'expert')), out_specs=(P(), P()))(
        parallel.shard_batch(x, mesh))
  assert float(mean) == x.mean() and float(total) == x.sum()


class LoadBias(nnx.Variable):
  """Non-gradient router state (a DeepSeek-style bias)."""


class BiasRouter(layers.TokensChoiceRouter):
  """Updates a bias from the batch's top-1 load, the way an aux-loss-free router does."""
  reduce = True

  def __init__(self, d_model, num_experts, *, rngs, **kw):
    super().__init__(d_model, num_experts, rngs=rngs, **kw)
    self.bias = LoadBias(jnp.zeros((num_experts,), jnp.float32))

  def __call__(self, x, *, token_ids=None):
    r = super().__call__(x, token_ids=token_ids)
    top1 = jax.nn.one_hot(jnp.argmax(self.gate(x), -1), self.bias.shape[0])
    load = jnp.mean(top1, axis=(0, 1))
    if self.reduce:
      load = parallel.global_mean(load)
    self.bias[...] = self.bias[...] + 0.1 * (1.0 / self.bias.shape[0] - load)
    return r


class LocalBiasRouter(BiasRouter):
  reduce = False


def check_router_state_identical_on_all_devices():
  layers.ROUTERS.update(bias_test=BiasRouter, local_bias_test=LocalBiasRouter)
  x = jax.random.normal(jax.random.key(3), (8, 6, D))
  ref = _layer(router='bias_test')
  nnx.jit(lambda m, x: m(x))(ref, x)
  mesh = parallel.make_mesh(dict(data=2, expert=4))
  with jax.set_mesh(mesh):
    layer = parallel.shard_module(_layer(router='bias_test'), mesh)
    nnx.jit(lambda m, x: m(x))(layer, parallel.shard_batch(np.asarray(x), mesh))
    bias = layer.router.bias[...]
    assert bias.sharding.is_fully_replicated, bias.sharding
    np.testing.assert_allclose(np.asarray(bias), np.asarray(ref.router.bias[...]), atol=1e-6)
    assert np.abs(np.asarray(bias)).max() > 0
    bad = parallel.shard_module(_layer(router='local_bias_test'), mesh)
    raises(lambda: bad(parallel.shard_batch(np.asarray(x), mesh)), 'differs between devices',
            'global_mean')


def check_noise_differs_across_devices():
  mesh = parallel.make_mesh(dict(data=2, expert=4))
  x = np.repeat(np.asarray(jax.random.normal(jax.random.key(4), (1, 6, D))), 8, axis=0)
  with jax.set_mesh(mesh):
    layer = _layer(router_kwargs=dict(k=1, noise_std=1.0))
    y, _ = nnx.jit(lambda m, x: m(x))(layer, parallel.shard_batch(x, mesh))
    count = layer.router.rngs.count[...]
  y = np.asarray(y)
  # Same example on every device: without per-device keys all outputs would be equal.
  assert len({y[i].tobytes() for i in range(8)}) == 8
  assert int(count) == 1, count          # the stream advanced once, like on one device


class TokenIdRouter(layers.Router):
  """Hash-style router: expert = token_id mod E (needs token_ids), weight from a gate."""
  needs_token_ids = True

  def __init__(self, d_model, num_experts, *, rngs, context=None):
    super().__init__(d_model, num_experts, rngs=rngs, context=context, gate_init_scale=0.1)

  def __call__(self, x, *, token_ids=None):
    probs = jax.nn.softmax(self.gate(x))
    index = (token_ids % self.num_experts)[..., None]
    weight = jnp.take_along_axis(probs, index, axis=-1)
    return routing.finish_token_routing(probs, index, weight, capacity=2)


def check_token_ids_reach_the_router():
  layers.ROUTERS.update(token_id_test=TokenIdRouter)
  layer = _layer(router='token_id_test', router_kwargs={})
  x = jax.random.normal(jax.random.key(5), (8, 6, D))
  ids = jax.random.randint(jax.random.key(6), (8, 6), 0, 100)
  fn = jax.jit(jax.value_and_grad(lambda m, x, i: jnp.sum(m(x, token_ids=i)[0] ** 2)))
  loss0, g0 = fn(layer, x, ids)
  mesh = parallel.make_mesh(dict(data=2, expert=4))
  with jax.set_mesh(mesh):
    parallel.shard_module(layer, mesh)
    loss1, g1 = fn(layer, *parallel.shard_batch((np.asarray(x), np.asarray(ids)), mesh))
  np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                       atol=1e-5), g1, g0)


def _ragged_case(n=4, t=6, d=3, h=5, num_experts=8, seed=0):
  rng = np.random.default_rng(seed)
  eid = np.sort(rng.integers(0, num_experts, (n, t)), axis=1)
  eid[1, 4:] = num_experts        # padding rows on device 1 (not sent)
  eid[2, :] = 3                   # every row of device 2 to one expert
  x = rng.normal(size=(n, t, d)).astype(np.float32)
  sizes = np.stack([np.bincount(e[e < num_experts], minlength=num_experts) for e in eid])
  w = rng.normal(size=(num_experts, d, h)).astype(np.float32)
  valid = (eid < num_experts)[..., None]
  return x, sizes.astype(np.int32), w, valid, np.minimum(eid, num_experts - 1)


def check_ragged_exchange():
  n = 4
  x, sizes, w, valid, eid = _ragged_case(n)
  mesh = jax.make_mesh((n,), ('expert',), devices=jax.devices()[:n])

  def reference(x, w):        # numpy-free but mesh-free: every row through its expert
    return jnp.where(valid, jnp.einsum('ntd,ntdh->nth', x, w[eid]), 0)

  with jax.set_mesh(mesh):
    args = [jax.device_put(a, P('expert')) for a in (x, sizes, w)]
    for impl in ('padded', 'emulated', 'ragged'):
      def body(x, gs, w, impl=impl):
        rows, local_sizes, plan = ragged.ragged_dispatch(x[0], gs[0], axis_name='expert', impl=impl)
        assert rows.shape == (n * x.shape[1], x.shape[2])
        return ragged.ragged_return(jax.lax.ragged_dot(rows, w, local_sizes), plan)[None]
      f = jax.jit(jax.shard_map(body, in_specs=(P('expert'),) * 3, out_specs=P('expert')))
      if impl == 'ragged':     # XLA:CPU cannot compile it: check that it lowers to the op
        assert 'ragged_all_to_all' in f.lower(*args).as_text()
        continue
      np.testing.assert_allclose(np.asarray(f(*args)), np.asarray(reference(x, w)), atol=1e-5)
      if impl == 'emulated':   # only checks the offsets handed to ragged_all_to_all
        continue
      loss = lambda f: (lambda x, w: jnp.sum(f(x, w) ** 2))
      g = jax.grad(loss(lambda x, w: f(x, args[1], w)), argnums=(0, 1))(args[0], args[2])
      g_ref = jax.grad(loss(reference), argnums=(0, 1))(x, w)
      for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


if __name__ == '__main__':
  run_checks(dict(globals()))

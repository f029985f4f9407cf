"""Sparse upcycling: dense ViT checkpoint -> MoE model (script and trainer option)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.train import checkpoint, upcycle, writers
from moe_jax.train.builders import build_model, build_optimizer
from moe_jax.train.trainer import train_and_evaluate
from scripts.upcycle import upcycle_to_workdir
from tests.train.vit_helpers import mock_fashion_mnist, persistent_xla_cache, tiny_config

RUN = dict(num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=2, **{
    'optimizer.warmup_steps': 1})
# Each token's two renormalised gates sum to 1 and C = S (capacity_factor = E / k): no drops.
NO_DROP_TOP2 = {'model.moe.router_kwargs.k': 2, 'model.moe.router_kwargs.renormalize': True,
                'model.moe.router_kwargs.capacity_factor': 2.0,
                'model.moe.router_kwargs.batch_priority': False}


def _restore(config, workdir):
  model = build_model(config, rngs=nnx.Rngs(123))
  optimizer = nnx.Optimizer(model, build_optimizer(config)[0], wrt=nnx.Param)
  mngr = checkpoint.make_manager(workdir, every=1, keep=5)
  restored = checkpoint.restore_latest(mngr, nnx.state((model, optimizer)))
  mngr.close()
  nnx.update((model, optimizer), restored.state)
  return model, optimizer, restored.meta


def _params(model):
  return {tuple(str(k) for k in p): np.asarray(v) for p, v in
          nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.slow
def test_upcycled_model_copies_the_dense_mlp_and_computes_the_dense_function(tmp_path):
  dense_cfg = tiny_config('dense,tiny', **RUN)
  moe_cfg = tiny_config('tokens_choice,tiny', **RUN, **NO_DROP_TOP2)
  with mock_fashion_mnist(), persistent_xla_cache(str(tmp_path / 'xla')):
    train_and_evaluate(dense_cfg, str(tmp_path / 'dense'))
    upcycle_to_workdir(moe_cfg, str(tmp_path / 'dense'), str(tmp_path / 'script'))
    moe, optimizer, meta = _restore(moe_cfg, str(tmp_path / 'script'))
    dense, _, _ = _restore(dense_cfg, str(tmp_path / 'dense'))
    # The trainer option reaches the same start: equal losses at every step.
    via_script = train_and_evaluate(moe_cfg, str(tmp_path / 'script'))
    opt_cfg = tiny_config('tokens_choice,tiny', **RUN, **NO_DROP_TOP2,
                          **{'init_from.dense_workdir': str(tmp_path / 'dense')})
    via_option = train_and_evaluate(opt_cfg, str(tmp_path / 'option'))

  assert meta['step'] == 0 and meta['upcycled_from'] == str(tmp_path / 'dense')
  d, m = _params(dense), _params(moe)
  e = moe_cfg.model.moe.num_experts
  mlp = {'w_in': 'fc1/kernel', 'b_in': 'fc1/bias', 'w_out': 'fc2/kernel', 'b_out': 'fc2/bias'}
  for name, src in mlp.items():
    experts = m[('blocks', '1', 'mlp', 'experts', name)]
    assert experts.shape[0] == e
    for i in range(e):
      np.testing.assert_array_equal(experts[i], d[('blocks', '1', 'mlp') + tuple(src.split('/'))])
  shared = [p for p in m if p[:3] != ('blocks', '1', 'mlp')]
  assert len(shared) == len(d) - 4
  for p in shared:
    np.testing.assert_array_equal(m[p], d[p])
  fresh = build_model(moe_cfg, rngs=nnx.Rngs(moe_cfg.seed))
  np.testing.assert_array_equal(m[('blocks', '1', 'mlp', 'router', 'gate', 'kernel')],
                                _params(fresh)[('blocks', '1', 'mlp', 'router', 'gate', 'kernel')])
  assert int(optimizer.step[...]) == 0
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(nnx.state(optimizer.opt_state))
             if jnp.issubdtype(x.dtype, jnp.floating))

  images = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
  moe.eval(), dense.eval()
  y_moe, aux = moe(images)
  y_dense, _ = dense(images)
  assert float(aux['block_01']['metrics']['dropped_fraction']) == 0.0
  assert np.abs(np.asarray(y_dense)).max() > 1e-3            # the dense head has trained
  np.testing.assert_allclose(y_moe, y_dense, atol=1e-5, rtol=1e-5)

  a = {r['step']: r['train/loss'] for r in writers.read_jsonl(str(tmp_path / 'script')) if 'train/loss' in r}
  b = {r['step']: r['train/loss'] for r in writers.read_jsonl(str(tmp_path / 'option')) if 'train/loss' in r}
  assert sorted(a) == sorted(b) == [1, 2]
  for s in a:
    assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])
  assert via_script['final'] == via_option['final']


def test_upcycle_params_errors_name_the_mismatch(tmp_path):
  dense = {('blocks', '0', 'mlp', 'fc1', 'kernel'): np.zeros((4, 8)),
           ('blocks', '0', 'mlp', 'fc1', 'bias'): np.zeros(8),
           ('head', 'kernel'): np.ones((4, 3))}
  moe = {('blocks', '0', 'mlp', 'experts', 'w_in'): np.zeros((2, 4, 8)),
         ('blocks', '0', 'mlp', 'experts', 'b_in'): np.zeros((2, 8)),
         ('blocks', '0', 'mlp', 'router', 'gate', 'kernel'): np.full((4, 2), 7.0),
         ('head', 'kernel'): np.zeros((4, 3))}
  out = upcycle.upcycle_params(dense, moe)
  np.testing.assert_array_equal(out[('head', 'kernel')], 1.0)
  np.testing.assert_array_equal(out[('blocks', '0', 'mlp', 'router', 'gate', 'kernel')], 7.0)
  with pytest.raises(ValueError, match='expert_hidden'):
    upcycle.upcycle_params(dense, {**moe, ('blocks', '0', 'mlp', 'experts', 'w_in'): np.zeros((2, 4, 16))})
  with pytest.raises(ValueError, match='same model sizes'):
    upcycle.upcycle_params(dense, {**moe, ('head', 'kernel'): np.zeros((4, 5))})
  with pytest.raises(ValueError, match='no place in the MoE model'):
    upcycle.upcycle_params({**dense, ('extra', 'w'): np.zeros(2)}, moe)
  with pytest.raises(ValueError, match='holds no checkpoint'):
    upcycle.load_dense_params(str(tmp_path / 'dense_run'))
  assert not (tmp_path / 'dense_run').exists()      # reading creates nothing
  dense_model = build_model(tiny_config('dense,tiny'), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='needs an MoE model'):
    upcycle.upcycle_train_state(None, (nnx.state(dense_model),))

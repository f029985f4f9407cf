"""ViT with MoE blocks: placement, patches, position embeddings, routers, token ids, sizes."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import routing
from moe_jax.layers import ROUTERS, Router
from moe_jax.models import PAPER_MOE, PRESETS, TOKEN_ID_FNS, ViT, extract_patches, moe_block_indices
from moe_jax.models.vit import sincos2d

TINY = dict(num_classes=10, image_size=28, channels=1, patch_size=7, width=16, depth=2, mlp_dim=32,
            num_heads=2)


@jax.jit
def forward(model, images, token_ids=None):
  """One compiled forward (much cheaper than op-by-op eager execution)."""
  return model(images, token_ids=token_ids)


def test_placement_matches_vmoe_and_soft_moe_conventions():
  assert moe_block_indices(12, every=2) == (1, 3, 5, 7, 9, 11)
  assert moe_block_indices(12, last_n=6) == (6, 7, 8, 9, 10, 11)
  assert moe_block_indices(12, last_n=5, every=2) == (7, 9, 11)
  assert moe_block_indices(12, layers=(11, 3, 3)) == (3, 11)
  assert moe_block_indices(4, last_n=0) == ()
  assert moe_block_indices(4) == (0, 1, 2, 3)


@pytest.mark.parametrize('kwargs', [dict(every=0), dict(last_n=13), dict(layers=(12,)),
                                    dict(layers=(1,), every=2)])
def test_placement_rejects_bad_values(kwargs):
  with pytest.raises(ValueError, match='moe|MoE'):
    moe_block_indices(12, **kwargs)


def test_extract_patches_matches_a_loop():
  x = np.random.default_rng(0).normal(size=(2, 6, 9, 2)).astype(np.float32)
  got = np.asarray(extract_patches(jnp.asarray(x), 3))
  want = np.stack([np.stack([x[b, i:i + 3, j:j + 3, :].reshape(-1)
                             for i in range(0, 6, 3) for j in range(0, 9, 3)]) for b in range(2)])
  np.testing.assert_array_equal(got, want)


def test_sincos2d_formula():
  h, w, d = 3, 4, 8
  emb = sincos2d(h, w, d)
  omega = 1.0 / 10_000 ** (np.arange(2) / 1.0)
  for (r, c) in [(0, 0), (2, 3), (1, 2)]:
    row = emb[r * w + c]
    np.testing.assert_allclose(row, np.concatenate([np.sin(c * omega), np.cos(c * omega),
                                                    np.sin(r * omega), np.cos(r * omega)]), atol=1e-6)


# Small-E kwargs for routers whose paper defaults need more than 4 experts.
SMALL_E_KWARGS = {'deepseek': dict(k=2), 'noisy_top_k': dict(k=2), 'dselect_k': dict(k=2)}


@pytest.mark.parametrize('router, pool', [(r, 'gap') for r in sorted(ROUTERS)] + [('soft_moe', 'token')])
def test_every_registered_router_runs_in_the_vit(router, pool):
  # 16 patch tokens per image: BASE needs S % E == 0; hash routers read the position ids.
  moe = dict(router=router, num_experts=4, last_n=1, router_kwargs=SMALL_E_KWARGS.get(router))
  model = ViT(**TINY, pool=pool, moe=moe, rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(1), (3, 28, 28, 1))
  logits, aux = forward(model, images)
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32
  assert list(aux) == ['block_01']
  assert set(aux['block_01']) == {'losses', 'metrics'}
  assert {'dropped_fraction', 'expert_load', 'router_entropy'} <= set(aux['block_01']['metrics'])
  assert np.isfinite(np.asarray(logits)).all()
  model.eval()
  logits2, _ = forward(model, images)
  assert np.isfinite(np.asarray(logits2)).all()


def test_dense_vit_has_no_aux_and_sincos_is_not_a_param():
  model = ViT(**TINY, posemb='sincos2d', rngs=nnx.Rngs(0))
  logits, aux = forward(model, jnp.zeros((2, 28, 28, 1)))
  assert aux == {} and logits.shape == (2, 10)
  names = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  assert not any('posemb' in jax.tree_util.keystr(p) for p, _ in names)


class _IdRouter(Router):
  """Test router: token t goes to expert token_ids[t] mod E (a hash router)."""
  causal = True
  needs_token_ids = True

  def __init__(self, d_model, num_experts, *, rngs, context=None):
    self.num_experts = num_experts
    self.seen = nnx.Variable(jnp.zeros((), jnp.int32))

  def __call__(self, x, *, token_ids=None):
    g, s, _ = x.shape
    e = self.num_experts
    expert = (token_ids % e).astype(jnp.int32)[..., None]
    probs = jax.nn.one_hot(expert[..., 0], e)
    return routing.finish_token_routing(probs, expert, jnp.ones((g, s, 1)), capacity=s)


def test_token_ids_reach_every_moe_layer_and_are_pluggable(monkeypatch):
  monkeypatch.setitem(ROUTERS, 'id_router', _IdRouter)
  moe = dict(router='id_router', num_experts=4, layers=(0, 1))
  model = ViT(**TINY, moe=moe, rngs=nnx.Rngs(0))
  images = jnp.ones((2, 28, 28, 1))
  _, aux = forward(model, images)        # default: position ids 0..15 -> uniform over 4 experts
  for name in ('block_00', 'block_01'):
    np.testing.assert_allclose(aux[name]['metrics']['expert_load'], [0.25] * 4, atol=1e-6)
  monkeypatch.setitem(TOKEN_ID_FNS, 'all_three',
                      lambda images, *, patch_size, num_tokens: jnp.full((images.shape[0], num_tokens), 3))
  model = ViT(**TINY, moe=moe, token_ids='all_three', rngs=nnx.Rngs(0))
  _, aux = forward(model, images)
  np.testing.assert_allclose(aux['block_01']['metrics']['expert_load'], [0, 0, 0, 1], atol=1e-6)
  ids = jnp.broadcast_to(jnp.arange(16) % 2, (2, 16))     # explicit ids override the function
  _, aux = forward(model, images, ids)
  np.testing.assert_allclose(aux['block_00']['metrics']['expert_load'], [0.5, 0.5, 0, 0], atol=1e-6)


def test_group_size_routes_several_images_together():
  moe = dict(router='experts_choice', num_experts=4, last_n=1, group_size=32,
             router_kwargs=dict(capacity_factor=1.0))
  model = ViT(**TINY, moe=moe, rngs=nnx.Rngs(0))
  logits, aux = forward(model, jax.random.normal(jax.random.key(0), (4, 28, 28, 1)))
  assert logits.shape == (4, 10)
  assert aux['block_01']['metrics']['expert_load'].shape == (4,)


@pytest.mark.parametrize('bad, match', [
    (dict(pool='max'), 'pool'), (dict(posemb='rope'), 'posemb'), (dict(patch_size=5), 'divisible'),
    (dict(token_ids='nope'), 'token_ids'), (dict(token_ids_kwargs=dict(levels=2)), 'token_ids_kwargs'),
    (dict(moe=dict(router='nope', num_experts=2, last_n=1)), 'router'),
    (dict(moe=dict(router='soft_moe', num_experts=2, last_n=1, typo=1)), 'typo'),
    (dict(dtype='float16'), 'dtype')])
def test_bad_options_raise_clear_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    ViT(**{**TINY, **bad}, rngs=nnx.Rngs(0))


def _param_count(**kw):
  """Parameters of ViT(**kw), from abstract shapes (no memory, no compile).

  Blocks of one kind are identical, so the count is linear in their number: we build
  one- and two-block models (eval_shape of a 32-block H/14 costs seconds of tracing).
  """
  depth, moe = kw.pop('depth'), dict(kw.pop('moe', None) or {})
  n_moe = len(moe_block_indices(depth, last_n=moe.pop('last_n'))) if moe else 0

  def count(d, layers):
    m = nnx.eval_shape(lambda: ViT(depth=d, moe=dict(moe, layers=layers) if layers else None,
                                   rngs=nnx.Rngs(0), **kw))
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(m, nnx.Param)))
  one, two = count(1, ()), count(2, ())
  total = one + (depth - 1) * (two - one)
  return total + n_moe * (count(1, (0,)) - one) if n_moe else total


def test_param_count_shortcut_matches_a_full_build():
  kw = dict(num_classes=10, image_size=28, channels=1, patch_size=7, width=16, mlp_dim=32, num_heads=2)
  moe = dict(router='tokens_choice', num_experts=4, last_n=3)
  full = nnx.eval_shape(lambda: ViT(depth=5, moe=moe, rngs=nnx.Rngs(0), **kw))
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(full, nnx.Param)))
  assert _param_count(depth=5, moe=dict(moe), **kw) == n


@pytest.mark.parametrize('size, millions', [('S/16', 22.0), ('B/16', 86.6), ('L/16', 304.3),
                                            ('H/14', 632.0)])
def test_paper_sizes_have_the_published_parameter_counts(size, millions):
  """ViT paper / DeiT counts for ImageNet-1k heads at 224 px."""
  n = _param_count(num_classes=1000, image_size=224, channels=3, **PRESETS[size])
  assert abs(n / 1e6 - millions) / millions < 0.01


@pytest.mark.parametrize('size, paper_moe, paper_dense', [
    ('S/16', 933e6, 33e6), ('B/16', 3.7e9, 108e6), ('L/16', 13.1e9, 333e6), ('H/14', 27.3e9, 669e6)])
def test_paper_soft_moe_presets_add_the_published_expert_parameters(size, paper_moe, paper_dense):
  """Soft MoE paper Table 1: params(Soft MoE) - params(ViT) (the JFT head cancels out)."""
  kw = dict(num_classes=1000, image_size=224, channels=3, **PRESETS[size])
  added = (_param_count(**kw, moe=dict(router='soft_moe', **PAPER_MOE[size]))
           - _param_count(**kw))
  assert abs(added - (paper_moe - paper_dense)) / (paper_moe - paper_dense) < 0.02


@pytest.mark.parametrize('path, arg, overrides', [
    ('configs/vit/fashion_mnist.py', 'soft_moe,tiny', {}),
    ('configs/vit/fashion_mnist.py', 'hash,small', {'model.token_ids': 'patch_content'}),
    ('configs/vit/fashion_mnist.py', 'dense,tiny', {}),
    ('configs/vit/imagenet.py', None, {})])
def test_vit_takes_every_config_model_field_as_a_keyword(path, arg, overrides):
  """The trainer builds MODELS[name](**config.model minus 'name'); no field is dropped."""
  from moe_jax.models import MODELS
  from moe_jax.train import config_lib
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  module = config_lib.load_config_module(os.path.join(root, path))
  c = config_lib.apply_overrides(module.get_config(arg), overrides)
  fields = {k: v for k, v in c.model.items() if k != 'name'}
  model = nnx.eval_shape(lambda: MODELS['vit'](**fields, rngs=nnx.Rngs(0)))
  assert model.size == c.model.size and len(model.blocks) == c.model.depth
  assert len(model.moe_blocks) == (0 if c.model.moe.router == 'dense' else c.model.moe.last_n)


def test_patch_content_options_reach_the_token_ids_with_their_pixel_range():
  options = dict(levels=3, bits=2, flat_std=0.05, seed=1, value_range=[-1.0, 1.0])
  model = ViT(**TINY, token_ids='patch_content', patch_content=options, rngs=nnx.Rngs(0))
  images = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1), minval=-1.0, maxval=1.0)
  want = TOKEN_ID_FNS['patch_content'](images, patch_size=7, num_tokens=16, levels=3, bits=2,
                                       flat_std=0.05, seed=1, value_range=(-1.0, 1.0))
  np.testing.assert_array_equal(np.asarray(model.default_token_ids(images)), np.asarray(want))
  # Ignored by position ids (configs carry the block whatever the token ids).
  model = ViT(**TINY, patch_content=options, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(model.default_token_ids(images))[0], np.arange(16))

"""Every shipped ViT config builds; bad values give clear errors."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from moe_jax.layers import LayerContext, MoeConfig, MoeLayer
from moe_jax.models import PAPER_MOE, moe_block_indices
from moe_jax.train import config_lib
from moe_jax.train.builders import build_model
from tests.train.vit_helpers import load_config_module

FMNIST = load_config_module('configs/vit/fashion_mnist.py')
IMAGENET = load_config_module('configs/vit/imagenet.py')


def _abstract_forward(config, batch=8):
  """Builds the config's model and runs it on abstract images: shapes only, nothing compiled."""
  model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
  m = config.model
  images = jax.ShapeDtypeStruct((batch, m.image_size, m.image_size, m.channels), jnp.float32)
  logits, aux = jax.eval_shape(lambda mdl, x: mdl(x), model, images)
  return model, logits, aux


@pytest.mark.parametrize('size', ['tiny', 'small'])
@pytest.mark.parametrize('router', FMNIST.ROUTERS)
def test_fashion_mnist_configs_build(router, size):
  config = FMNIST.get_config(f'{router},{size}')
  config_lib.validate(config)
  model, logits, aux = _abstract_forward(config)
  assert logits.shape == (8, 10)
  depth = config.model.depth
  want = [] if router == 'dense' else [f'block_{i:02d}' for i in range(depth // 2, depth)]
  assert sorted(aux) == want
  assert config.model.moe.router == router


@pytest.mark.parametrize('router', IMAGENET.ROUTERS)
def test_imagenet_configs_build_at_s16(router):
  config = IMAGENET.get_config(f'{router},S/16')
  config_lib.validate(config)
  _, logits, aux = _abstract_forward(config)
  assert logits.shape == (8, 1000)
  assert len(aux) == (0 if router == 'dense' else 6)
  if router in ('tokens_choice', 'experts_choice'):
    assert config.model.moe.group_size == 8 * 196 and config.model.moe.num_experts == 32


# One whole paper-size model beyond S/16 (an H/14 costs ~15 s of tracing); every size's
# MoE layers and placement are built in test_every_imagenet_config_builds_its_moe_layers.
@pytest.mark.parametrize('size', ['B/16'])
def test_imagenet_soft_moe_configs_build_at_paper_sizes(size):
  config = IMAGENET.get_config(f'soft_moe,{size}')
  model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
  assert len(model.moe_blocks) == PAPER_MOE[size]['last_n']
  assert model.blocks[-1].mlp.num_experts == 128


@pytest.mark.parametrize('module', [FMNIST, IMAGENET])
def test_config_docstrings_give_the_command_and_result(module):
  doc = ' '.join(module.__doc__.replace('\\\n', ' ').split())
  assert 'python -m moe_jax.train.main --config=configs/vit/' in doc
  assert 'Result' in doc


@pytest.mark.parametrize('arg, match', [('soft_moe,huge', "'huge' is not one of"),
                                        ('router=foo', "router='foo' must be one of"),
                                        ('colour=red', "unknown config argument 'colour'")])
def test_bad_config_arguments_are_named(arg, match):
  with pytest.raises(ValueError, match=match):
    FMNIST.get_config(arg)


@pytest.mark.parametrize('field, value, match', [
    ('model.moe.router', 'top3', "config.model.moe.router: 'top3' is not 'dense' or one of"),
    ('model.moe.engine', 'magic', 'config.model.moe.engine'),
    ('model.patch_size', 5, r'config.model.*patch_size 5'),
    ('optimizer.warmup_steps', 10_000, 'lower --config.optimizer.warmup_steps'),
    ('mesh.expert', 0, 'config.mesh.expert: must be >= 1 or -1'),
    ('batch_size', 0, 'config.batch_size: must be an int >= 1'),
    ('seed', -1, r'config.seed: must be an int in \[0, 2\*\*31\)'),
    ('model.token_ids', 'pixels', "config.model.*token_ids.*'pixels'"),
    ('model.moe.router_kwargs.topk', 2, "config.model.moe.router_kwargs.topk: .* takes no"),
    ('task.name', 'translation', "config.task.name: 'translation' is not one of"),
    ('model.name', 'resnet', "config.model.name: 'resnet' is not one of"),
])
def test_bad_config_values_raise_clear_errors(field, value, match):
  config = config_lib.apply_overrides(FMNIST.get_config('soft_moe,tiny'), {field: value})
  with pytest.raises(ValueError, match=match):
    config_lib.validate(config)


def test_moe_without_placement_is_rejected():
  config = FMNIST.get_config('tokens_choice,tiny')
  config.model.moe.last_n = None
  with pytest.raises(ValueError, match='placement'):
    build_model(config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('size', IMAGENET.SIZES)
@pytest.mark.parametrize('router', IMAGENET.ROUTERS)
def test_every_imagenet_config_builds_its_moe_layers(router, size):
  """Every router x size: the config validates, and its placement and one MoE block build
  at full size (abstractly); whole models are built above for S/16 and B/16."""
  config = IMAGENET.get_config(f'{router},{size}')
  config_lib.validate(config)
  m, moe = config.model, MoeConfig.from_dict(config.model.moe)
  if router == 'dense':
    assert moe is None
    return
  tokens = (m.image_size // m.patch_size) ** 2
  assert moe_block_indices(m.depth, **moe.placement()) == tuple(
      range(m.depth - PAPER_MOE[size]['last_n'], m.depth))
  layer = nnx.eval_shape(lambda: MoeLayer.from_config(
      moe, m.width, default_hidden=m.mlp_dim, dtype=jnp.bfloat16, rngs=nnx.Rngs(0),
      context=LayerContext(tokens_per_group=moe.group_size or tokens)))
  assert layer.router_name == router and layer.num_experts == moe.num_experts
  y, _ = jax.eval_shape(lambda l, x: l(x), layer,
                        jax.ShapeDtypeStruct((8, tokens, m.width), jnp.bfloat16))
  assert y.shape == (8, tokens, m.width)

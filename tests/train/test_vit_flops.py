"""FLOP and parameter accounting against XLA's cost analysis and hand-written formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.layers import MoeLayer
from moe_jax.models import ViT
from moe_jax.train import flops

ARCH = dict(num_classes=10, image_size=28, channels=1, patch_size=7, width=16, depth=2, mlp_dim=32,
            num_heads=2)


def vit_forward_flops(batch, *, image_size, channels, patch_size, width, depth, mlp_dim, num_classes,
                      **_):
  """Multiply-adds × 2 of a dense ViT forward, written from the architecture (Dosovitskiy 2021)."""
  n = (image_size // patch_size) ** 2
  d, s = width, n
  embed = 2 * n * patch_size ** 2 * channels * d
  block = (2 * s * d * 3 * d          # qkv projection
           + 2 * s * s * d * 2        # q·k and attention·v
           + 2 * s * d * d            # output projection
           + 2 * 2 * s * d * mlp_dim)  # MLP
  return batch * (embed + depth * block + 2 * d * num_classes)


def test_xla_counts_a_dense_vit_like_the_formula():
  arch = dict(ARCH, width=64, mlp_dim=256, num_heads=4)
  model = nnx.eval_shape(lambda: ViT(**arch, rngs=nnx.Rngs(0)))
  x = jax.ShapeDtypeStruct((4, 28, 28, 1), jnp.float32)
  xla = flops.xla_flops(lambda m, x: m(x)[0], model, x)
  want = vit_forward_flops(4, **arch)
  # XLA adds the elementwise work (norms, softmax, gelu, biases): a few percent on top.
  assert want <= xla <= 1.08 * want, (xla, want)


@pytest.mark.parametrize('router, kwargs, engine', [
    ('tokens_choice', dict(k=2, capacity_factor=1.0), 'einsum'),
    ('tokens_choice', dict(k=1, capacity_factor=1.5), 'einsum'),
    ('experts_choice', dict(capacity_factor=2.0), 'einsum'),
    ('soft_moe', dict(num_slots=2), 'einsum'),
])
def test_moe_formula_agrees_with_xla_where_xla_counts_right(router, kwargs, engine):
  """Expert matmuls on [E, G·C, d] and the one-hot / soft einsums are counted right by XLA.

  (Not the gather / dropless engines on CPU: they run the experts in a loop over row
  blocks, and XLA's cost analysis counts a loop body once, whatever its trip count.)
  """
  d, e, h, b, s = 16, 4, 64, 3, 16
  layer = MoeLayer(d, e, h, router=router, router_kwargs=kwargs, engine=engine, rngs=nnx.Rngs(0))
  cost = flops.moe_layer_cost(layer, b, s)
  x = jax.ShapeDtypeStruct((b, s, d), jnp.float32)
  xla = flops.xla_flops(lambda l, x: l(x)[0], layer, x)
  # The formula's parts, independently: G = b groups of S = s tokens.
  c = cost.capacity
  experts = b * e * c * 2 * 2 * d * h
  one_hot = 2 * 2 * b * s * e * c * d if (engine == 'einsum' or router == 'soft_moe') else 0
  assert cost.experts == experts and cost.dispatch_combine == one_hot
  assert 0.9 * cost.forward <= xla <= 1.25 * cost.forward, (xla, cost.forward)


def _calls(model, batch=1):
  """Each MoE layer's call shapes on a batch of 28x28 images (what the trainer records)."""
  return flops.moe_calls(model, {'images': jax.ShapeDtypeStruct((batch, 28, 28, 1), jnp.float32)})


def test_moe_calls_record_every_moe_layer_with_its_input_shape():
  model = ViT(**dict(ARCH, depth=3), moe=dict(router='tokens_choice', num_experts=4, every=2),
              rngs=nnx.Rngs(0))
  calls = flops.moe_calls(model, {'images': jax.ShapeDtypeStruct((5, 28, 28, 1), jnp.float32)})
  assert list(calls) == ['block_01']
  layer, b, s = calls['block_01']
  assert layer is model.blocks[1].mlp and (b, s) == (5, 16)


def test_train_step_flops_replace_only_the_moe_part():
  model = ViT(**ARCH, moe=dict(router='tokens_choice', num_experts=4, last_n=1, engine='einsum'),
              rngs=nnx.Rngs(0))
  out = flops.train_step_flops(1e9, _calls(model, batch=4))
  layer = out['layers']['block_01']
  assert layer['groups'] == 4 and layer['tokens_per_group'] == 16 and layer['capacity'] == 5
  assert out['moe_formula_train'] == pytest.approx(3 * layer['forward'])
  assert out['train_step'] == pytest.approx(1e9 - out['moe_xla_train'] + out['moe_formula_train'])
  # Where XLA counts the layer right (einsum engine), swapping in the formula changes little.
  assert abs(out['moe_formula_train'] - out['moe_xla_train']) < 0.35 * out['moe_xla_train']
  dense = ViT(**ARCH, rngs=nnx.Rngs(0))
  assert flops.train_step_flops(1e9, _calls(dense, batch=4))['train_step'] == 1e9


@pytest.mark.parametrize('router, kwargs, experts_per_token', [
    ('tokens_choice', dict(k=1, capacity_factor=1.0), 1.0),     # C = 16/4: 4·4/16 slots per token
    ('tokens_choice', dict(k=2, capacity_factor=1.0), 2.0),
    ('experts_choice', dict(capacity_factor=2.0), 2.0),
    ('soft_moe', dict(num_slots=1), 4 / 16),                   # 4 slots shared by 16 tokens
])
def test_active_params_count_expert_slots_per_token(router, kwargs, experts_per_token):
  model = ViT(**ARCH, moe=dict(router=router, router_kwargs=kwargs, num_experts=4, last_n=1),
              rngs=nnx.Rngs(0))
  counts = flops.param_counts(model, _calls(model))
  size = lambda t: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(t))
  total = size(nnx.state(model, nnx.Param))
  one_expert = size(nnx.state(model.blocks[1].mlp.experts, nnx.Param)) / 4
  assert counts['total'] == total and counts['experts'] == 4 * one_expert
  assert counts['active'] == round(total - 4 * one_expert + experts_per_token * one_expert)
  dense_model = ViT(**ARCH, rngs=nnx.Rngs(0))
  dense = flops.param_counts(dense_model, _calls(dense_model))
  assert dense['active'] == dense['total'] and dense['experts'] == 0

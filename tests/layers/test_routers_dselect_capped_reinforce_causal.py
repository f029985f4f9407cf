"""DSelect-k, capped expert choice, REINFORCE and causal Soft MoE inside `MoeLayer`: jit,
both engines, train and eval mode, gradients into the router parameters, and the common
metrics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.layers import ROUTERS, MoeLayer
from moe_jax.layers.engines import EinsumEngine, GatherEngine
from moe_jax.layers.routers.dselect_k import DSelectKRouter
from tests.layers._rbg import rngs

D, E, H = 8, 4, 16     # shared with the other layer tests (one initialisation per shape)

CASES = [
    ('dselect_k', dict()),
    ('experts_choice_capped', dict(max_experts_per_token=3, num_iters=20)),
    ('reinforce', dict(k=2, entropy_weight=1e-2)),
    ('soft_moe_causal', dict(slots_per_position=2)),
]


def test_registry_names():
  for name in ('dselect_k', 'experts_choice_capped', 'reinforce', 'soft_moe_causal'):
    assert name in ROUTERS
  assert ROUTERS['soft_moe_causal'].causal and ROUTERS['reinforce'].causal
  assert ROUTERS['dselect_k'].causal and not ROUTERS['experts_choice_capped'].causal


def test_dselect_k_static_gate_shares_one_selection_and_eval_capacity():
  router = DSelectKRouter(D, 6, k=2, gate='static', eval_capacity_factor=1.0, rngs=rngs(0))
  assert router.z_logits.shape == (2, 3) and router.w_logits.shape == (2,)
  assert np.abs(np.asarray(router.z_logits[...])).max() <= 0.01       # U(-γ/100, γ/100)
  assert np.abs(np.asarray(router.w_logits[...])).max() <= 0.05
  z, w = router.selector_logits(jnp.zeros((2, 5, D)))
  assert z.shape == (2, 5, 2, 3) and np.all(z == router.z_logits[...])
  assert np.all(w == router.w_logits[...])


@pytest.mark.parametrize('name,kwargs', CASES)
def test_router_in_moe_layer(name, kwargs):
  train = MoeLayer(D, E, H, router=name, router_kwargs=kwargs, engine='gather', rngs=rngs(0))
  evaluating = nnx.clone(train)
  evaluating.eval()
  x = jnp.array(np.random.default_rng(0).normal(size=(2, 8, D)), jnp.float32)

  @nnx.jit
  def run(train, evaluating, x):
    def loss(layer):
      r = layer.router(x)      # one routing, both engines
      y_einsum = EinsumEngine().apply(x, r, layer.experts)
      y_gather = GatherEngine().apply(x, r, layer.experts)
      return jnp.mean(y_gather ** 2) + sum(r.aux_losses.values()), (y_einsum, y_gather)

    grads, train_outputs = nnx.grad(loss, has_aux=True)(train)
    r = evaluating.router(x)
    y_eval, aux = evaluating(x)                    # MoeLayer path, gather engine
    eval_outputs = (EinsumEngine().apply(x, r, evaluating.experts), y_eval)
    return train_outputs, eval_outputs, grads.router, aux

  train_outputs, eval_outputs, router_grads, aux = run(train, evaluating, x)
  for y_einsum, y_gather in (train_outputs, eval_outputs):
    assert y_einsum.shape == x.shape and np.all(np.isfinite(y_einsum))
    np.testing.assert_allclose(y_einsum, y_gather, atol=1e-5)
  leaves = jax.tree.leaves(router_grads)
  assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
  assert any(np.abs(g).max() > 0 for g in leaves)
  metrics = aux['metrics']
  for key in ('dropped_fraction', 'unrouted_fraction', 'router_entropy'):
    assert np.isfinite(float(metrics[key]))
  assert float(jnp.sum(metrics['expert_load'])) == pytest.approx(1.0, abs=1e-5)
  assert train.is_causal == ROUTERS[name].causal

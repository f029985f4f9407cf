"""Routers of catalogue C inside `MoeLayer`: jit, both engines, train and eval mode,
gradients into the router parameters, and the common metrics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.layers import ROUTERS, MoeLayer
from moe_jax.layers.engines import EinsumEngine, GatherEngine

D, E, H = 8, 4, 16     # shared with the other layer tests (one initialisation per shape)

CASES = [
    ('dselect_k', dict()),
    ('dselect_k', dict(gate='static', k=1, eval_capacity_factor=1.0)),
    ('experts_choice_capped', dict(max_experts_per_token=3, num_iters=20)),
    ('reinforce', dict(k=2, entropy_weight=1e-2)),
    ('soft_moe_causal', dict(slots_per_position=2)),
]


def test_registry_names():
  for name in ('dselect_k', 'experts_choice_capped', 'reinforce', 'soft_moe_causal'):
    assert name in ROUTERS
  assert ROUTERS['soft_moe_causal'].causal and ROUTERS['reinforce'].causal
  assert ROUTERS['dselect_k'].causal and not ROUTERS['experts_choice_capped'].causal


@pytest.mark.parametrize('name,kwargs', CASES)
def test_router_in_moe_layer(name, kwargs):
  train = MoeLayer(D, E, H, router=name, router_kwargs=kwargs, engine='gather', rngs=nnx.Rngs(0))
  evaluating = nnx.clone(train)
  evaluating.eval()
  x = jnp.array(np.random.default_rng(0).normal(size=(2, 8, D)), jnp.float32)

  @nnx.jit
  def run(train, evaluating, x):
    outputs = []
    for layer in (train, evaluating):
      r = layer.router(x)      # one routing, both engines
      outputs.append([eng.apply(x, r, layer.experts) for eng in (EinsumEngine(), GatherEngine())])

    def loss(layer):
      y, aux = layer(x)
      return jnp.mean(y ** 2) + sum(aux['losses'].values())

    grads = nnx.grad(loss)(train)
    return outputs, grads.router, evaluating(x)

  outputs, router_grads, (y_eval, aux) = run(train, evaluating, x)
  for y_einsum, y_gather in outputs:
    assert y_einsum.shape == x.shape and np.all(np.isfinite(y_einsum))
    np.testing.assert_allclose(y_einsum, y_gather, atol=1e-5)
  np.testing.assert_allclose(y_eval, outputs[1][0], atol=1e-5)     # eval is deterministic
  leaves = jax.tree.leaves(router_grads)
  assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
  assert any(np.abs(g).max() > 0 for g in leaves)
  metrics = aux['metrics']
  for key in ('dropped_fraction', 'unrouted_fraction', 'router_entropy'):
    assert np.isfinite(float(metrics[key]))
  assert float(jnp.sum(metrics['expert_load'])) == pytest.approx(1.0, abs=1e-5)
  assert train.is_causal == ROUTERS[name].causal

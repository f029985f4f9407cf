"""Per-token routing views (`inspection.views`) against numpy references, and the
routing recorder of the MoE layer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import nnx

from moe_jax import layers, routing
from moe_jax.inspection import views
from moe_jax.models import ViT


def _record(r, batch_shape, perm=None, name='moe'):
  return layers.RoutingRecord(name, r, perm, batch_shape)


def np_slot_views(slot_token, slot_weight, num_tokens):
  """(weight, dispatched) [G, S, E] read slot by slot off the table."""
  g, e, c = slot_token.shape
  weight = np.zeros((g, num_tokens, e))
  dispatched = np.zeros((g, num_tokens, e))
  for gi in range(g):
    for ei in range(e):
      for ci in range(c):
        t = slot_token[gi, ei, ci]
        if t < num_tokens:
          weight[gi, t, ei] += slot_weight[gi, ei, ci]
          dispatched[gi, t, ei] += 1
  return weight, dispatched


def test_sparse_view_reads_the_slot_table_and_counts_drops():
  logits = jax.random.normal(jax.random.key(0), (3, 10, 4))
  r = routing.tokens_choice(logits, k=2, capacity=3)    # per group 20 choices, 12 slots
  v = jax.tree.map(np.asarray, views.token_view(_record(r, (3, 10))))
  weight, dispatched = np_slot_views(np.asarray(r.slot_token), np.asarray(r.slot_weight), 10)
  np.testing.assert_allclose(v['weight'], weight, rtol=1e-6)
  np.testing.assert_array_equal(v['dispatched'], dispatched)
  # Every token asked for k = 2 slots: what it did not get was dropped.
  np.testing.assert_array_equal(v['dropped'], 2 - dispatched.sum(-1))
  assert v['dropped'].max() > 0
  dropped_fraction = v['dropped'].sum() / (3 * 10 * 2)
  assert dropped_fraction == pytest.approx(float(r.metrics['dropped_fraction']), abs=1e-6)
  # The view's expert load is the logged one.
  np.testing.assert_allclose(v['dispatched'].sum((0, 1)) / v['dispatched'].sum(),
                             r.metrics['expert_load'], rtol=1e-6)


def test_regrouped_and_shuffled_tokens_come_back_in_batch_order():
  """B=2 examples of S=6 tokens routed as G=3 groups of 4, shuffled by `perm`."""
  rng = np.random.default_rng(1)
  perm = rng.permutation(12)
  # Routed position p of the flattened groups holds batch token perm[p]: expert of that
  # token = its batch index mod 3, so the answer is known in batch order.
  experts = (perm % 3).reshape(3, 4, 1)
  r = routing.finish_token_routing(jnp.full((3, 4, 3), 1 / 3), jnp.asarray(experts),
                                   jnp.ones((3, 4, 1)), capacity=4)
  v = views.token_view(_record(r, (2, 6), perm=jnp.asarray(perm)), num_examples=2)
  top = views.top_expert(jax.tree.map(np.asarray, v))
  np.testing.assert_array_equal(top, (np.arange(12) % 3).reshape(2, 6))
  assert views.token_view(_record(r, (2, 6), perm=jnp.asarray(perm)), 1)['weight'].shape == (1, 6, 3)


def test_dense_view_is_soft_moe_dispatch_and_combine():
  logits = np.asarray(jax.random.normal(jax.random.key(2), (2, 5, 3, 2)))   # [G, S, E, P]
  v = jax.tree.map(np.asarray, views.token_view(_record(routing.soft_moe(jnp.asarray(logits)),
                                                        (2, 5))))
  dispatch = scipy.special.softmax(logits, axis=1)
  combine = scipy.special.softmax(logits.reshape(2, 5, 6), axis=-1)
  np.testing.assert_allclose(v['slot_dispatch'], dispatch.reshape(2, 5, 6), rtol=1e-5)
  np.testing.assert_allclose(v['slot_combine'], combine, rtol=1e-5)
  np.testing.assert_allclose(v['weight'], combine.reshape(2, 5, 3, 2).sum(-1), rtol=1e-5)
  np.testing.assert_allclose(v['slot_dispatch'].sum(1), 1.0, rtol=1e-5)   # a slot mixes its group
  assert not v['dropped'].any()


def test_top_expert_prefers_the_largest_weight_among_the_experts_that_took_the_token():
  view = dict(weight=np.array([[[0.2, 0.0, 0.5], [0.0, 0.0, 0.0], [0.0, 0.1, 0.0]]]),
              dispatched=np.array([[[1, 0, 1], [0, 0, 0], [1, 1, 0]]]))
  np.testing.assert_array_equal(views.top_expert(view), [[2, -1, 1]])


def test_a_vit_records_every_moe_layer_by_name_and_views_match_its_metrics():
  model = ViT(num_classes=3, image_size=8, channels=1, patch_size=4, width=8, depth=3,
              mlp_dim=16, num_heads=2, rngs=nnx.Rngs(0),
              moe=dict(router='tokens_choice', num_experts=4, layers=(0, 2), group_size=2,
                       router_kwargs=dict(k=2, capacity_factor=0.5)))
  model.eval()
  images = jax.random.normal(jax.random.key(3), (3, 8, 8, 1))
  got = views.routing_views(model, {'images': images}, num_examples=2)
  _, aux = model(images)
  assert sorted(got) == sorted(aux) == ['block_00', 'block_02']
  for name, v in got.items():
    assert v['weight'].shape == (2, 4, 4) and v['dropped'].shape == (2, 4)
  full = views.routing_views(model, {'images': images})
  for name, v in full.items():
    load = v['dispatched'].sum((0, 1)) / v['dispatched'].sum()
    np.testing.assert_allclose(load, aux[name]['metrics']['expert_load'], rtol=1e-6)
    assert v['dropped'].sum() / (3 * 4 * 2) == pytest.approx(
        float(aux[name]['metrics']['dropped_fraction']), abs=1e-6)
  with layers.recording_routings() as outer:
    model(images)
  assert [r.name for r in outer] == ['block_00', 'block_02'] and outer[0].batch_shape == (3, 4)

"""`BaseLayersRouter`: BASE layers (Lewis et al. 2021), registry name 'base'.

    layer = MoeLayer(d, E, h, router='base', rngs=...)     # S tokens per group, S % E == 0

Params: `centroids` w_e [E, d] (the paper's expert embeddings), orthogonal init with
gain 0.1 (fairseq). Affinity A[t, e] = h_t · w_e in float32.

* training: the optimal balanced assignment (`routing.base_layers`), every expert exactly S/E
  tokens per group, nothing dropped; with `shuffle=True` (fairseq's default
  `base_shuffle`) the tokens of all groups are first permuted at random across the
  batch, so each assignment problem sees a random mix of the batch (the paper's random
  routing step between workers); `MoeLayer` undoes the permutation after the combine.
* evaluation: greedy top-1 (argmax of A), no balancing, no shuffle.
* combine weight σ(h_t · w_e): the paper's h_t + σ(h_t·w_e) f_e(h_t) with the residual
  h_t added by the transformer block. Gradients reach w_e only through this gate.
  Unlike fairseq, whose gate reads the un-normalised block input, ours reads the MoE
  layer input (after the block's pre-norm), like every other router here.
* no aux loss. Not causal (the assignment looks at every token of the group).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.layers.moe_config import LayerContext
from moe_jax.layers.routers.base import Router
from moe_jax.routing import base_layers
from moe_jax.routing.capacity import EVAL_CAPACITY_KWARGS, CapacitySpec
from moe_jax.routing.types import Routing

Array = jax.Array


class BaseLayersRouter(Router):
  """BASE router.

  router_kwargs:
    shuffle: permute the tokens of all groups before the assignment in training
      (default True, fairseq `base_shuffle=1`); needs the `gating` rng stream (falls
      back to `default`).
    init_gain: gain of the orthogonal centroid init (default 0.1).
    eval_capacity (and the other evaluation capacity keywords): C at evaluation
      (default S, nothing dropped, as in the paper). Training always gives every expert
      exactly S/E tokens.
  """
  routing_fn = staticmethod(base_layers.base_routing)
  set_by_router = ('train',)
  default_capacity = CapacitySpec()
  capacity_kwargs = EVAL_CAPACITY_KWARGS
  causal = False

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs,
               context: LayerContext | None = None, shuffle: bool = True,
               init_gain: float = 0.1, **kwargs):
    init = jax.nn.initializers.orthogonal(scale=init_gain)
    self.centroids = nnx.Param(init(rngs.params(), (num_experts, d_model), jnp.float32))
    self.shuffle = shuffle
    super().__init__(d_model, num_experts, rngs=rngs, context=context, kwargs=kwargs,
                     stochastic=shuffle)

  def affinities(self, x: Array) -> Array:
    """x: [G, S, d] -> A [G, S, E] float32."""
    return jnp.einsum('gsd,ed->gse', x.astype(jnp.float32), self.centroids[...],
                      precision=jax.lax.Precision.HIGHEST)

  def token_permutation(self, num_groups: int, num_tokens: int) -> Array | None:
    if not self.shuffle or self.deterministic or num_groups == 1:
      return None
    return jax.random.permutation(self.rngs(), num_groups * num_tokens).astype(jnp.int32)

  def __call__(self, x: Array, *, token_ids: Array | None = None) -> Routing:
    # Training ignores the capacity (exactly S/E per expert); evaluation uses it.
    return base_layers.base_routing(self.affinities(x), train=not self.deterministic,
                                    capacity=self.slots(x.shape[1]))

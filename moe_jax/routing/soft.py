"""Soft MoE routing (Puigcerver et al. 2023, arXiv 2308.00951, eqs. 1-3).

    D[m, n, p] = softmax over tokens m of logits[m, n, p]          (dispatch)
    C[m, n, p] = softmax over all slots (n, p) of logits[m, n, p]  (combine)
    slot inputs  X~[n, p] = Σ_m D[m, n, p] X[m]
    outputs      Y[m] = Σ_{n,p} C[m, n, p] f_n(X~[n, p])

Fully differentiable, nothing dropped, no auxiliary loss. Mixes every token of a group
into every slot, so it is not causal (see `soft_moe_causal` for decoders).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing.metrics import dense_metrics
from moe_jax.routing.types import Routing

Array = jax.Array


def soft_moe(logits: Array) -> Routing:
  """Soft MoE dispatch and combine weights.

  Args:
    logits: [G, S, E, P] token-slot logits (E experts with P slots each).

  Returns:
    A dense `Routing` with C = P: dispatch and combine `[G, S, E, P]`.
  """
  g, s, e, p = logits.shape
  # Everything on the [G, S, E·P] view: XLA:CPU runs ops on arrays with a trailing axis
  # of size P = 1 (the paper's default) several times slower.
  flat = logits.astype(jnp.float32).reshape(g, s, e * p)
  dispatch = jax.nn.softmax(flat, axis=1).reshape(g, s, e, p)
  combine = jax.nn.softmax(flat, axis=-1)
  metrics = dense_metrics(dispatch, combine, router_logits=flat)
  return Routing(num_tokens=s, dispatch_weights=dispatch, combine_weights=combine.reshape(g, s, e, p),
                 metrics=metrics)

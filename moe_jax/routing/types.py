"""The `Routing` type: who goes where, with what weight.

Every router ends in a `Routing`; every engine turns a `Routing` into an expert buffer
`[E, G, C, d]` and back. Two forms exist:

* **sparse** (slot table): for each group g, expert e and slot c, the source token
  `slot_token[g, e, c]` in `[0, S)` (or `S`, meaning "empty slot") and its combine weight
  `slot_weight[g, e, c]`. Token-choice, expert-choice, hash, BASE... routers produce this.
  Token-choice style routers also fill the token-side view (`token_expert`,
  `token_weight`, `token_slot`), the assignment *before* capacity, which the dropless
  engine and the metrics use.
* **dense**: `dispatch_weights` and `combine_weights`, each `[G, S, E, C]`, for Soft MoE.

`Routing.dense()` gives the dense view of either form, so tests and plots can look at
every router the same way.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
  """A routing decision for `G` groups of `S` tokens over `E` experts with `C` slots each.

  Attributes:
    num_tokens: S, tokens per group (static).
    slot_token: [G, E, C] int32, source token of each slot; `S` marks an empty slot.
    slot_weight: [G, E, C] float32, combine weight of each slot (0 for empty slots).
    token_expert: [G, S, K] int32, expert chosen by each token (pre-capacity).
    token_weight: [G, S, K] float32, combine weight of each choice (pre-capacity).
    token_slot: [G, S, K] int32, flat slot `e * C + c` each choice landed in, or `E * C`
      when the choice was dropped by capacity.
    dispatch_weights: [G, S, E, C] float32 (dense form only).
    combine_weights: [G, S, E, C] float32 (dense form only).
    aux_losses: name -> scalar, already multiplied by their coefficients; the trainer
      adds their sum to the task loss.
    metrics: name -> array, for logging (never differentiated).
  """
  num_tokens: int = dataclasses.field(metadata=dict(static=True))
  slot_token: Array | None = None
  slot_weight: Array | None = None
  token_expert: Array | None = None
  token_weight: Array | None = None
  token_slot: Array | None = None
  dispatch_weights: Array | None = None
  combine_weights: Array | None = None
  aux_losses: dict[str, Any] = dataclasses.field(default_factory=dict)
  metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def is_sparse(self) -> bool:
    return self.slot_token is not None

  @property
  def num_experts(self) -> int:
    ref = self.slot_token if self.is_sparse else self.dispatch_weights
    return ref.shape[1] if self.is_sparse else ref.shape[2]

  @property
  def capacity(self) -> int:
    """C: slots per expert per group."""
    return self.slot_token.shape[2] if self.is_sparse else self.dispatch_weights.shape[3]

  @property
  def num_groups(self) -> int:
    ref = self.slot_token if self.is_sparse else self.dispatch_weights
    return ref.shape[0]

  def dense(self) -> tuple[Array, Array]:
    """Returns `(dispatch, combine)`, each `[G, S, E, C]` float32.

    For the sparse form, `dispatch[g, s, e, c]` is 1 when token s fills slot (e, c)
    and `combine = dispatch * slot_weight`.
    """
    if not self.is_sparse:
      return self.dispatch_weights, self.combine_weights
    # one_hot of the sentinel S is all zeros, so empty slots dispatch nothing.
    onehot = jax.nn.one_hot(self.slot_token, self.num_tokens, dtype=jnp.float32)  # [G,E,C,S]
    dispatch = jnp.transpose(onehot, (0, 3, 1, 2))
    combine = dispatch * self.slot_weight[:, None, :, :].astype(jnp.float32)
    return dispatch, combine

  def replace(self, **changes) -> Routing:
    return dataclasses.replace(self, **changes)

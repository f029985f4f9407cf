"""Which MoE layers a model calls, on what shapes: for FLOP accounting of any model.

    with recording_moe_calls() as calls:
      jax.eval_shape(lambda: model(**inputs))     # abstract: nothing is computed
    for call in calls:                             # in call order
      call.layer, call.x_shape, call.has_token_ids

Recording happens at trace time (plain Python), so it sees every call of a traced or
abstractly evaluated model; outside the context manager it costs nothing.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any

_CALLS: contextvars.ContextVar[list | None] = contextvars.ContextVar('moe_calls', default=None)


@dataclasses.dataclass(frozen=True)
class MoeCall:
  layer: Any                       # the MoeLayer
  x_shape: tuple[int, ...]         # [B, S, d]
  has_token_ids: bool


@contextlib.contextmanager
def recording_moe_calls():
  calls: list[MoeCall] = []
  token = _CALLS.set(calls)
  try:
    yield calls
  finally:
    _CALLS.reset(token)


def record(layer, x_shape, has_token_ids: bool) -> None:
  calls = _CALLS.get()
  if calls is not None:
    calls.append(MoeCall(layer, tuple(x_shape), has_token_ids))

"""Training cost: FLOPs (XLA for the dense parts, a formula for MoE layers) and parameters.

XLA's cost analysis counts dense matmuls exactly but not MoE layers: a dropless engine's
`ragged_dot` counts every expert on CPU, one-hot einsums count zeros, and sorts and
scatters count nothing. So for each MoE layer we take

    forward = router (XLA: the gate is a plain matmul, for any registered router)
            + dispatch and combine einsums: 2 · 2·G·S·E·C·d for dense routings (Soft MoE)
              and for the 'einsum' engine; 0 for gather/scatter engines (data movement)
            + experts: G·E·C · flops_per_token (every capacity slot is computed, as in
              the Soft MoE paper's cost), or G·S·k · flops_per_token for dropless engines

and training = 3 × forward (backward = 2 × forward). The train step's total is XLA's
count of the whole compiled step minus XLA's count of each MoE layer's forward+backward
compiled alone, plus 3 × the formula above. G groups, S tokens per group, E experts,
C slots per expert, d width.

Parameters: `total` counts every `nnx.Param`; `active` counts the parameters applied
to one token: everything outside the experts plus, per MoE layer, one expert's
parameters times the expert slots per token (E·C/S: k·capacity_factor for token
choice, c for expert choice, E·P/S for Soft MoE; k for dropless engines).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.layers import MoeLayer, recording_moe_calls

DROPLESS_ENGINES = ('dropless',)


def xla_flops(fn, *args) -> float:
  """FLOPs of `jax.jit(fn)(*args)` by XLA's cost analysis (args may be ShapeDtypeStructs)."""
  ca = jax.jit(fn).lower(*args).compile().cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get('flops', 0.0))


@dataclasses.dataclass
class MoeLayerCost:
  """Shapes and forward FLOPs of one MoE layer on one batch."""
  groups: int
  tokens_per_group: int
  num_experts: int
  capacity: int
  k: int | None               # choices per token (token-side routings), else None
  dense_routing: bool
  engine: str
  d_model: int
  expert_flops_per_token: int
  router: float               # XLA, forward
  dispatch_combine: float     # formula, forward
  experts: float              # formula, forward

  @property
  def forward(self) -> float:
    return self.router + self.dispatch_combine + self.experts

  @property
  def slots_per_token(self) -> float:
    if self.engine in DROPLESS_ENGINES and self.k:
      return float(self.k)
    return self.num_experts * self.capacity / self.tokens_per_group


def _moe_paths(model: nnx.Module) -> dict[int, str]:
  return {id(m): '/'.join(str(p) for p in path) for path, m in nnx.iter_graph(model)
          if isinstance(m, MoeLayer)}


def moe_calls(model: nnx.Module, inputs: dict) -> dict[str, tuple[MoeLayer, int, int]]:
  """{layer name: (layer, B, S)} for every MoE layer call of `model(**inputs)`.

  Runs the model abstractly (`jax.eval_shape`: shapes only) while
  `layers.recording_moe_calls` records each MoE layer's input shape, so it works for any
  model and stack (an encoder and a decoder see different sequence lengths). Names are
  the layers' `context.name` (what the model reports in aux), else their module path.

  Args:
    model: any model; inputs: its keyword inputs (arrays or ShapeDtypeStructs).
  """
  traced_paths = {}

  def forward(m, kw):
    traced_paths.update(_moe_paths(m))     # the trace works on a copy of the model
    return m(**kw)

  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), inputs)
  with recording_moe_calls() as calls:
    jax.eval_shape(forward, model, abstract)
  by_path = {'/'.join(str(p) for p in path): m for path, m in nnx.iter_graph(model)
             if isinstance(m, MoeLayer)}
  out = {}
  for call in calls:
    path = traced_paths[id(call.layer)]
    layer = by_path[path]
    name = layer.context.name or path
    while name in out:     # a layer called twice (shared weights) counts twice
      name += "'"
    out[name] = (layer, call.x_shape[0], call.x_shape[1])
  return out


def _grouped_shapes(layer: MoeLayer, batch: int, seq: int):
  x = jax.ShapeDtypeStruct((batch, seq, layer.d_model), jnp.float32)
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  return jax.eval_shape(layer._group, x), jax.eval_shape(layer._group, ids)


def moe_layer_cost(layer: MoeLayer, batch: int, seq: int, *, xla_router: bool = True) -> MoeLayerCost:
  """Forward cost of `layer` on x [batch, seq, d] (router FLOPs 0 unless `xla_router`)."""
  xg, ids = _grouped_shapes(layer, batch, seq)
  call = lambda r, x, i: r(x, token_ids=i)
  routing = jax.eval_shape(call, layer.router, xg, ids)
  g, s, d = xg.shape
  e, c = routing.num_experts, routing.capacity
  dense = not routing.is_sparse
  k = routing.token_expert.shape[-1] if routing.token_expert is not None else None
  fpt = layer.experts.flops_per_token()
  engine = layer.engine_name
  one_hot = dense or engine == 'einsum'
  dispatch_combine = 2 * (2.0 * g * s * e * c * d) if one_hot else 0.0
  if engine in DROPLESS_ENGINES and k:
    experts = float(g * s * k * fpt)
  else:
    experts = float(g * e * c * fpt)
  return MoeLayerCost(groups=g, tokens_per_group=s, num_experts=e, capacity=c, k=k,
                      dense_routing=dense, engine=engine, d_model=d, expert_flops_per_token=fpt,
                      router=xla_flops(call, layer.router, xg, ids) if xla_router else 0.0,
                      dispatch_combine=dispatch_combine, experts=experts)


def moe_layer_xla_train_flops(layer: MoeLayer, batch: int, seq: int) -> float:
  """XLA's count of the layer's forward + backward (grads of params and input) alone."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x = jax.ShapeDtypeStruct((batch, seq, layer.d_model), jnp.float32)

  def f(params, x):
    y, aux = nnx.merge(graphdef, params, rest)(x, token_ids=jnp.zeros(x.shape[:2], jnp.int32))
    return jnp.sum(y) + sum(jax.tree.leaves(aux['losses']), 0.0)
  return xla_flops(jax.grad(f, argnums=(0, 1)), params, x)


def train_step_flops(step_xla_flops: float, calls: dict, *, devices: int = 1) -> dict:
  """FLOPs of one training step (see the module docstring).

  Args:
    step_xla_flops: XLA's count for the compiled train step (fwd + bwd + update).
    calls: `moe_calls(model, inputs)` of the step's (global) batch.
    devices: under a mesh (`jax.set_mesh`), its size: XLA then counts one device's share
      of the SPMD program, so its counts are multiplied by `devices` (this also counts the
      replicated optimizer update `devices` times, a small excess).
  """
  layers = {n: moe_layer_cost(l, b, s) for n, (l, b, s) in calls.items()}
  moe_xla = devices * sum(moe_layer_xla_train_flops(l, b, s) for l, b, s in calls.values())
  moe_formula = 3.0 * sum(c.forward for c in layers.values())
  step_xla_flops = devices * step_xla_flops
  return dict(train_step=step_xla_flops - moe_xla + moe_formula, xla_train_step=step_xla_flops,
              moe_xla_train=moe_xla, moe_formula_train=moe_formula,
              layers={n: dict(dataclasses.asdict(c), forward=c.forward) for n, c in layers.items()})


def param_counts(model: nnx.Module, calls: dict) -> dict:
  """{'total', 'active', 'experts'}: parameter counts (see the module docstring).

  `calls`: `moe_calls(model, inputs)`, which gives each MoE layer's tokens per group.
  """
  size = lambda tree: int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))
  total = size(nnx.state(model, nnx.Param))
  expert_total, active_experts = 0, 0.0
  seen = set()
  for layer, b, s in calls.values():
    if id(layer) in seen:
      continue
    seen.add(id(layer))
    n = size(nnx.state(layer.experts, nnx.Param))
    cost = moe_layer_cost(layer, b, s, xla_router=False)
    expert_total += n
    active_experts += n / layer.num_experts * min(layer.num_experts, cost.slots_per_token)
  return dict(total=total, experts=expert_total, active=int(round(total - expert_total + active_experts)))

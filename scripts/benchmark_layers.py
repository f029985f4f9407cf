"""MoE layer vs the dense MLP of the same active FLOPs: forward+backward time, roofline,
memory, FLOPs.

    python scripts/benchmark_layers.py                 # full table (make bench)
    python scripts/benchmark_layers.py --quick         # smoke test, tiny shapes
    python scripts/benchmark_layers.py --experts 8 --engines dropless --tile 64
    python scripts/benchmark_layers.py --soft-sweep    # Soft MoE at fixed total slots

For each (E, router, k, engine) row four jitted functions are warmed up, then timed
in turn `--reps` times each, so load on the machine hits all alike; **time ×** is the
median over reps of MoE time / dense time of the same rep:

* the MoE step: `MoeLayer` (router + engine + experts, aux losses included), input
  `x [G, S, d]`;
* the dense reference: the MLP a model would use instead, with the same active FLOPs:
  tokens as a 2-D `[G·S, d]` array (no transposes in its backward pass), hidden k·h,
  biases, the same activation;
* the roofline probes (`scripts/roofline.py`): one expert's MLP on R = T·k/E rows with
  its weights in cache (E of them make the expert matmuls at the speed this machine
  reaches at that row count), and a pass that reads the expert weights twice and
  writes their gradients once. Their sum (plus Soft MoE's routing einsums at the
  dense MLP's FLOP/s) is the best time physically possible for the row; **share** is
  roofline / MoE time.

Memory: the compiled executables' memory analysis (temp = activations and scratch;
parameters and their gradients are arguments and outputs, E times larger for the MoE by
design). FLOPs: counted analytically (XLA's cost analysis counts a while-loop body once
and ragged_dot on CPU densely; its figure is kept in the JSON).

Rows are written to `<out>/layers_<backend>.json` as soon as they are measured; a rerun
skips the rows already there (`--force` re-measures), so the run can resume. The JSON
records the load average (`/proc/loadavg`) before and after the run and per row, and the
allocator. `<out>/layers_<backend>.md` is regenerated from the JSON at the end: the
table, then the issue's targets (ratios to the dense MLP in the same run), each marked
met / not met / not measured. Run it alone on the machine (`flock /tmp/cpu.lock ...`
where several jobs share it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
if __name__ == '__main__':
  # First thing: re-execute once under TCMalloc when installed (see moe_jax/allocator.py).
  from moe_jax import allocator as _allocator
  _allocator.use_fast_allocator()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from moe_jax import allocator, layers  # noqa: E402
from moe_jax.layers import engines as engines_lib  # noqa: E402
from moe_jax.layers.engines import grouped  # noqa: E402
from scripts import roofline  # noqa: E402

ROUTER_ENGINES = {   # router -> engines that run it natively (others delegate)
    'tokens_choice': ('einsum', 'gather', 'dropless'),
    'experts_choice': ('einsum', 'gather'),
    'soft_moe': ('einsum', 'gather'),     # gather: einsum dispatch/combine, expert blocks
}
ENGINE_ORDER = ['einsum', 'gather', 'gather_batched', 'dropless', 'dropless_ragged']
# --ablation: token choice only; row name -> (engine, engine_kwargs, largest E to run it at).
ABLATION_ENGINES = {
    'gather_batched': ('gather', dict(experts_impl='batched'), 1 << 30),
    'dropless_ragged': ('dropless', dict(impl='ragged'), 8),   # E x FLOPs on CPU
}
METHOD = 'issue-15: dense on 2-D tokens with biases; roofline probes alternated'


def parse_args(argv=None):
  gpu = jax.default_backend() != 'cpu'
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='benchmarks')
  p.add_argument('--quick', action='store_true', help='tiny sizes, 2 reps, writes *_quick.*')
  p.add_argument('--soft-sweep', action='store_true',
                 help='Soft MoE at --soft-slots slots per group for E in --soft-experts: '
                      'routing+dispatch+combine alone and with the experts')
  p.add_argument('--soft-slots', type=int, default=128)
  p.add_argument('--soft-experts', default='8,16,32,64,128')
  p.add_argument('--experts', default='8,64,256')
  p.add_argument('--ks', default='1,2')
  p.add_argument('--routers', default=','.join(ROUTER_ENGINES))
  p.add_argument('--engines', default='einsum,gather,dropless')
  p.add_argument('--ablation', action='store_true',
                 help='add the batched-experts gather engine and ragged_dot dropless')
  p.add_argument('--tokens', type=int, default=32768 if gpu else 8192)
  p.add_argument('--group-size', type=int, default=512,
                 help='tokens per routing group S of token / expert choice (a T5 sequence)')
  p.add_argument('--soft-group-size', type=int, default=256,
                 help='tokens per Soft MoE group (a ViT image); slots = tokens')
  p.add_argument('--d-model', type=int, default=1024 if gpu else 256)
  p.add_argument('--hidden', type=int, default=4096 if gpu else 1024)
  p.add_argument('--capacity-factor', type=float, default=1.25)
  p.add_argument('--dtype', default='bfloat16' if gpu else 'float32')
  p.add_argument('--tile', type=int, default=None, help='dropless block height (default: auto)')
  p.add_argument('--dropless-impl', default='auto', choices=grouped.IMPLS,
                 help="dropless grouped MLP: 'auto' (ragged_dot on GPU/TPU, blocks on CPU)")
  p.add_argument('--reps', type=int, default=9)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--force', action='store_true', help='re-measure rows already in the JSON')
  a = p.parse_args(argv)
  if a.quick:
    a.tokens, a.d_model, a.hidden, a.reps, a.warmup = 512, 32, 64, 2, 1
    a.group_size, a.soft_group_size, a.soft_slots = 64, 64, 16
    a.experts, a.ks, a.soft_experts = '8', '2', '4,16'
  return a


def group_size(a, router):
  return a.soft_group_size if router == 'soft_moe' else a.group_size


def row_key(e, router, k, engine):
  return f'E={e}|{router}|k={k}|{engine}'


def make_moe(a, e, router, k, num_slots=None):
  if router == 'tokens_choice':
    kw = dict(k=k, capacity_factor=a.capacity_factor)
  elif router == 'experts_choice':
    kw = dict(capacity_factor=float(k))     # c = k: the same expert compute as top-k
  else:
    kw = dict(num_slots=num_slots or max(1, a.soft_group_size // e))   # default: slots = tokens
  return layers.MoeLayer(a.d_model, e, a.hidden, router=router, router_kwargs=kw, engine='einsum',
                         dtype=jnp.dtype(a.dtype), rngs=nnx.Rngs(0))


def engine_of(a, row_engine):
  """The engine object of a table row: its name, or an ablation variant; the dropless
  options from the command line."""
  if row_engine in ABLATION_ENGINES:
    name, options, _ = ABLATION_ENGINES[row_engine]
  else:
    name, options = row_engine, {}
  if name == 'dropless':
    options = dict(dict(impl=a.dropless_impl, tile=a.tile), **options)
  return engines_lib.get_engine(name, **options)


def moe_loss_fn(layer, engine, experts=True):
  """`engine`: the engine object the layer runs with. `experts=False`: the same step
  with identity experts (routing, dispatch and combine alone)."""
  layer.engine = engine
  # Identity experts: no expert parameters to differentiate (their zero gradients
  # would cost a memset of the size of all expert weights).
  wrt = nnx.Param if experts else nnx.All(nnx.Param, nnx.PathContains('router'))
  graphdef, params, rest = nnx.split(layer, wrt, ...)

  def loss(params, x, ct):
    model = nnx.merge(graphdef, params, rest)
    if experts:
      y, aux = model(x)
    else:
      r = model.router(x)
      y, aux = model.engine.apply(x, r, lambda buf: buf), dict(losses=r.aux_losses,
                                                                metrics=r.metrics)
    # The metrics are outputs, as in training (where they are logged).
    return jnp.sum(y.astype(jnp.float32) * ct) + sum(aux['losses'].values()), aux['metrics']
  return loss, params


def dense_loss_fn(a, hidden, key):
  """The dense MLP a model would use: x [T, d] (2-D), biases, gelu, hidden `hidden`."""
  k1, k2 = jax.random.split(key)
  dt = jnp.dtype(a.dtype)
  params = dict(w_in=jax.random.normal(k1, (a.d_model, hidden)) / a.d_model ** 0.5,
                b_in=jnp.zeros(hidden), w_out=jax.random.normal(k2, (hidden, a.d_model)) / hidden ** 0.5,
                b_out=jnp.zeros(a.d_model))

  def loss(params, x, ct):
    p = jax.tree.map(lambda v: v.astype(dt), params)
    h = jax.nn.gelu(x.astype(dt) @ p['w_in'] + p['b_in'])
    return jnp.sum((h @ p['w_out'] + p['b_out']).astype(jnp.float32) * ct)
  return loss, params


def compile_step(loss, params, x, ct, has_aux=True):
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=has_aux))
  compiled = step.lower(params, x, ct).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  info = dict(temp_bytes=int(mem.temp_size_in_bytes), arg_bytes=int(mem.argument_size_in_bytes),
              out_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
              xla_flops=float((cost or {}).get('flops', float('nan'))))
  info['peak_bytes'] = info['temp_bytes'] + info['arg_bytes'] + info['out_bytes'] - info['alias_bytes']
  return (lambda: compiled(params, x, ct)), info


def executed_rows(engine, r, e):
  """Rows the experts' MLP runs on, padding included (the engine says, if it can)."""
  if hasattr(engine, 'executed_rows'):
    return int(engine.executed_rows(r, e))
  return r.num_groups * e * r.capacity


def analytic_flops(a, e, router, k, engine, layer, x):
  """Forward+backward FLOPs (3× forward): useful = the dense MLP's; executed = what the
  engine computes, padding and one-hot einsums included; routing = Soft MoE's logits,
  dispatch and combine einsums (0 otherwise)."""
  t, s, d, h = a.tokens, group_size(a, router), a.d_model, a.hidden
  per_row = 2 * 2 * d * h                      # one token through one expert, forward
  kk = 1 if router == 'soft_moe' else k
  useful = 3 * (t * kk * per_row + 2 * t * d)  # + biases
  gate = 2 * t * d * e
  r = layer.router(x)
  if router == 'soft_moe':
    c = layer.router.num_slots
    slots = e * c
    rows, extra = (t // s) * slots, 3 * 2 * t * slots * d    # logits, dispatch, combine
    routing_flops = 3 * extra
  else:
    c = r.capacity
    rows, extra, routing_flops = executed_rows(engine, r, e), 0, 0
    if engine.name == 'einsum':
      extra = 2 * 2 * t * e * c * d
  executed = 3 * (rows * per_row + gate + extra)
  return useful, executed, routing_flops, c


def time_alternately(fns, reps, warmup):
  """{name: fn} -> {name: (wall seconds [reps], process CPU seconds [reps])}, the
  functions called in turn, so that load hits all alike."""
  for _ in range(warmup):
    for fn in fns.values():
      jax.block_until_ready(fn())
  out = {name: ([], []) for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      c0, t0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(fn())
      out[name][0].append(time.perf_counter() - t0)
      out[name][1].append(time.process_time() - c0)
  return out


def loadavg() -> str:
  try:
    with open('/proc/loadavg') as f:
      return f.read().strip()
  except OSError:
    return ' '.join(f'{v:.2f}' for v in os.getloadavg())


def measure_row(a, e, router, k, engine):
  kx, kc = jax.random.split(jax.random.key(1))
  s = group_size(a, router)
  x = jax.random.normal(kx, (a.tokens // s, s, a.d_model), jnp.float32)
  ct = jax.random.normal(kc, x.shape, jnp.float32)
  layer = make_moe(a, e, router, k)
  loss, params = moe_loss_fn(layer, engine_of(a, engine))
  moe_fn, moe_info = compile_step(loss, params, x, ct)
  kk = 1 if router == 'soft_moe' else k
  dloss, dparams = dense_loss_fn(a, kk * a.hidden, jax.random.key(2))
  x2, ct2 = x.reshape(-1, a.d_model), ct.reshape(-1, a.d_model)     # the dense MLP's 2-D tokens
  dense_fn, dense_info = compile_step(dloss, dparams, x2, ct2, has_aux=False)
  rows = a.tokens * kk // e                                          # per expert, useful
  mlp_fn, n_mlp = roofline.expert_mlp_probe(rows, a.d_model, a.hidden, jnp.dtype(a.dtype))
  num_params = sum(v.size for v in layer.experts.params_dict().values())
  traffic_fn = roofline.weight_traffic_probe(num_params, layer.experts.w_in[...].dtype)
  load0 = loadavg()
  t = time_alternately(dict(moe=moe_fn, dense=dense_fn, mlp=mlp_fn, traffic=traffic_fn),
                       a.reps, a.warmup)
  useful, executed, routing_flops, c = analytic_flops(a, e, router, k, layer.engine, layer, x)
  med = {name: statistics.median(v[0]) for name, v in t.items()}
  ms, ds = med['moe'], med['dense']
  matmul_s = e * med['mlp'] / n_mlp
  routing_s = routing_flops / (useful / ds)      # Soft MoE's einsums at the dense MLP's FLOP/s
  roof = matmul_s + med['traffic'] + routing_s
  # The figure of merit: the median over reps of MoE / dense timed back to back (robust
  # to load that drifts during the row).
  pair = statistics.median(m / d for m, d in zip(t['moe'][0], t['dense'][0]))
  return dict(E=e, router=router, k=k, engine=engine, S=s, C=c, moe_ms=1e3 * ms, dense_ms=1e3 * ds,
              time_ratio=pair, ratio_of_medians=ms / ds, moe_times=t['moe'][0],
              dense_times=t['dense'][0],
              moe_cpu=t['moe'][1], dense_cpu=t['dense'][1],
              min_ratio=min(t['moe'][0]) / min(t['dense'][0]),
              cpu_ratio=statistics.median(t['moe'][1]) / statistics.median(t['dense'][1]),
              roofline=dict(ms=1e3 * roof, expert_matmul_ms=1e3 * matmul_s,
                            weight_traffic_ms=1e3 * med['traffic'], routing_einsum_ms=1e3 * routing_s,
                            rows_per_expert=rows,
                            expert_gflops=roofline.mlp_flops(rows, a.d_model, a.hidden) * n_mlp
                            / med['mlp'] / 1e9,
                            weight_bytes=num_params * layer.experts.w_in[...].dtype.itemsize,
                            traffic_gbs=3 * num_params * layer.experts.w_in[...].dtype.itemsize
                            / med['traffic'] / 1e9),
              roofline_ratio=roof / ds, share=roof / ms,
              moe_mem=moe_info, dense_mem=dense_info,
              temp_ratio=moe_info['temp_bytes'] / max(dense_info['temp_bytes'], 1),
              useful_flops=useful, executed_flops=executed,
              tflops=useful / ms / 1e12, dense_tflops=useful / ds / 1e12,
              load=[float(load0.split()[0]), float(loadavg().split()[0])])


def config_of(a):
  keys = ('tokens', 'group_size', 'soft_group_size', 'd_model', 'hidden', 'capacity_factor',
          'dtype', 'tile', 'dropless_impl', 'reps')
  return dict({k: getattr(a, k) for k in keys}, backend=jax.default_backend(),
              device=jax.devices()[0].device_kind, jax=jax.__version__, cpus=os.cpu_count(),
              machine=platform.machine(), default_impl=grouped.default_impl(), method=METHOD)


def write_markdown(path, data):
  cfg = data['config']
  lines = [f"Backend {cfg['backend']} ({cfg['device']}, {cfg['cpus']} CPUs), jax {cfg['jax']}, "
           f"{cfg['tokens']} tokens in groups of S={cfg['group_size']} (Soft MoE: "
           f"{cfg['soft_group_size']}, slots = S), d={cfg['d_model']}, "
           f"h={cfg['hidden']}, {cfg['dtype']}, capacity factor {cfg['capacity_factor']}, "
           f"median of {cfg['reps']} forward+backward steps, allocator: "
           f"{data.get('allocator', '?')}; load average before / after: "
           f"{data.get('loadavg_before', '?')} / {data.get('loadavg_after', '?')}.", '',
           '| E | router | k | C | engine | MoE ms | dense ms | time × | roofline × | share '
           '| executed × | temp × | load |',
           '|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  order = lambda r: (r['E'], list(ROUTER_ENGINES).index(r['router']), r['k'],
                     ENGINE_ORDER.index(r['engine']) if r['engine'] in ENGINE_ORDER else 99)
  for row in sorted(data['rows'].values(), key=order):
    lines.append(
        f"| {row['E']} | {row['router']} | {row['k']} | {row['C']} | {row['engine']} "
        f"| {row['moe_ms']:.0f} | {row['dense_ms']:.0f} | **{row['time_ratio']:.2f}** "
        f"| {row['roofline_ratio']:.2f} | {100 * row['share']:.0f}% "
        f"| {row['executed_flops'] / row['useful_flops']:.2f} | {row['temp_ratio']:.2f} "
        f"| {row['load'][0]:.1f} |")
  lines += ['', '**Targets** (issue 15; ratios to the dense MLP of the same run):', '']
  lines += [f'- {text}: {verdict}' for text, verdict in targets(data['rows'])]
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def targets(rows: dict) -> list[tuple[str, str]]:
  """[(target, 'met (...)' | 'NOT met (...)' | 'not measured')] for the issue's targets.

  "Best engine" is the fastest engine of a (E, router, k), ablation variants included.
  Each ratio is followed by the roofline's (the best possible on this machine).
  """
  def best(e, router, k):
    cands = [r for r in rows.values() if (r['E'], r['router'], r['k']) == (e, router, k)]
    return min(cands, key=lambda r: r['time_ratio']) if cands else None

  def check(text, found, limits):
    if not found or any(r is None for _, r in found):
      return text, 'not measured'
    parts = ', '.join(f'{label} {r["time_ratio"]:.2f}x ({r["engine"]}; roofline '
                      f'{r["roofline_ratio"]:.2f}x)' for label, r in found)
    ok = all(r['time_ratio'] <= lim for (_, r), lim in zip(found, limits))
    return text, ('met' if ok else 'NOT met') + f': {parts}'

  out = [check('top-2 token choice (cf 1.25), best engine <= 1.15x at E = 8, <= 1.25x at 64, '
               '<= 1.6x at 256', [(f'E={e}', best(e, 'tokens_choice', 2)) for e in (8, 64, 256)],
               (1.15, 1.25, 1.6))]
  dropless = [(f'E={e} k={k}', rows.get(row_key(e, 'tokens_choice', k, 'dropless')))
              for e in (8, 64) for k in (1, 2)]
  out.append(check('dropless <= 1.25x at E = 8, 64 (k = 1, 2)', dropless, (1.25,) * 4))
  out.append(check('Soft MoE (slots = tokens), best engine <= 1.3x at E = 8, 64',
                   [(f'E={e}', best(e, 'soft_moe', 1)) for e in (8, 64)], (1.3, 1.3)))
  return out


def soft_sweep(a):
  """Soft MoE with `a.soft_slots` slots per group of `a.soft_group_size` tokens for each E:
  the step with identity experts (routing + dispatch + combine), the full step and the
  dense MLP (hidden h) timed alternately. Writes soft_sweep_<backend>.{json,md}."""
  stem = os.path.join(a.out, f"soft_sweep_{jax.default_backend()}{'_quick' if a.quick else ''}")
  kx, kc = jax.random.split(jax.random.key(1))
  s = a.soft_group_size
  x = jax.random.normal(kx, (a.tokens // s, s, a.d_model), jnp.float32)
  ct = jax.random.normal(kc, x.shape, jnp.float32)
  dloss, dparams = dense_loss_fn(a, a.hidden, jax.random.key(2))
  dense_fn, _ = compile_step(dloss, dparams, x.reshape(-1, a.d_model), ct.reshape(-1, a.d_model),
                             has_aux=False)
  data = dict(config=dict(config_of(a), soft_slots=a.soft_slots), allocator=allocator.describe(),
              loadavg_before=loadavg(), rows=[])
  for e in map(int, a.soft_experts.split(',')):
    layer = make_moe(a, e, 'soft_moe', 1, num_slots=a.soft_slots // e)
    fns = {}
    for name, with_experts in (('route', False), ('full', True)):
      loss, params = moe_loss_fn(layer, engine_of(a, 'einsum'), experts=with_experts)
      fns[name] = compile_step(loss, params, x, ct)[0]
    fns['dense'] = dense_fn
    t = time_alternately(fns, a.reps, a.warmup)
    med = {n: 1e3 * statistics.median(v[0]) for n, v in t.items()}
    pair = lambda n: statistics.median(m / d for m, d in zip(t[n][0], t['dense'][0]))
    row = dict(E=e, P=a.soft_slots // e, route_ms=med['route'], full_ms=med['full'],
               dense_ms=med['dense'], experts_ms=med['full'] - med['route'],
               route_ratio=pair('route'), full_ratio=pair('full'),
               times={n: v[0] for n, v in t.items()}, load=loadavg())
    data['rows'].append(row)
    print(f"E={e:4d} P={row['P']:3d}  route {row['route_ms']:7.1f} ms  full {row['full_ms']:7.1f} ms"
          f"  dense {row['dense_ms']:7.1f} ms  load {row['load']}", flush=True)
  data['loadavg_after'] = loadavg()
  base = data['rows'][0]['route_ratio']
  lines = [f"Soft MoE, {a.soft_slots} slots per group of {s} tokens, {a.tokens} tokens, "
           f"d={a.d_model}, h={a.hidden}, {a.dtype}, einsum engine, median of {a.reps} "
           f"forward+backward steps, allocator: {data['allocator']}; load average before / "
           f"after: {data['loadavg_before']} / {data['loadavg_after']}. 'route' = routing + "
           "dispatch + combine (identity experts); 'experts' = full - route; ratios to the "
           "dense MLP (hidden h, 2-D tokens) timed alternately with them.", '',
           '| E | P | route ms | experts ms | full ms | dense ms | route / dense | route vs first E |',
           '|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in data['rows']:
    lines.append(f"| {r['E']} | {r['P']} | {r['route_ms']:.1f} | {r['experts_ms']:.1f} "
                 f"| {r['full_ms']:.1f} | {r['dense_ms']:.1f} | {r['route_ratio']:.3f} "
                 f"| {r['route_ratio'] / base:.2f}x |")
  with open(stem + '.json', 'w') as f:
    json.dump(data, f, indent=1)
  with open(stem + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  print(f'wrote {stem}.json and {stem}.md')


def main(argv=None):
  a = parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  if a.soft_sweep:
    return soft_sweep(a)
  stem = os.path.join(a.out, f"layers_{jax.default_backend()}{'_quick' if a.quick else ''}")
  data = dict(config=config_of(a), rows={})
  if os.path.exists(stem + '.json'):
    with open(stem + '.json') as f:
      old = json.load(f)
    same = lambda c: {k: v for k, v in c.items() if k not in ('device', 'reps')}
    if same(old['config']) != same(data['config']):
      sys.exit(f'{stem}.json was measured with another configuration; delete it or use --out.')
    data['rows'] = old['rows']
  data['allocator'] = allocator.describe()
  data['loadavg_before'] = loadavg()
  print(f"allocator: {data['allocator']}; load average {data['loadavg_before']}", flush=True)
  engines = a.engines.split(',') + (list(ABLATION_ENGINES) if a.ablation else [])
  for e in map(int, a.experts.split(',')):
    for router in a.routers.split(','):
      # Soft MoE has no k: one row (k=1: the dense equivalent has hidden h).
      for k in ([1] if router == 'soft_moe' else map(int, a.ks.split(','))):
        for engine in engines:
          native = ROUTER_ENGINES[router]
          ablation = engine in ABLATION_ENGINES and router == 'tokens_choice'
          if engine not in native and not ablation:
            continue
          if ablation and e > ABLATION_ENGINES[engine][2] and jax.default_backend() == 'cpu':
            continue
          key = row_key(e, router, k, engine)
          if key in data['rows'] and not a.force:
            continue
          row = measure_row(a, e, router, k, engine)
          data['rows'][key] = row
          print(f"{key:40s} {row['moe_ms']:8.1f} ms  dense {row['dense_ms']:8.1f} ms  "
                f"x{row['time_ratio']:.2f}  roofline x{row['roofline_ratio']:.2f}  "
                f"share {100 * row['share']:.0f}%  load {row['load'][0]:.1f}", flush=True)
          data['loadavg_after'] = loadavg()
          with open(stem + '.json.tmp', 'w') as f:
            json.dump(data, f, indent=1)
          os.replace(stem + '.json.tmp', stem + '.json')
  data['loadavg_after'] = loadavg()
  with open(stem + '.json', 'w') as f:
    json.dump(data, f, indent=1)
  write_markdown(stem + '.md', data)
  for text, verdict in targets(data['rows']):
    print(f'{text}: {verdict}')
  print(f'wrote {stem}.json and {stem}.md')


if __name__ == '__main__':
  main()

"""MoE layer vs its dense-equivalent MLP: forward+backward time, memory, FLOPs.

    python scripts/benchmark_layers.py                 # full table (make bench)
    python scripts/benchmark_layers.py --quick         # smoke test, seconds
    python scripts/benchmark_layers.py --experts 8 --engines dropless --tile 64

For each (E, router, k, engine) row the MoE layer (router + engine + experts, aux
losses included) and the dense-equivalent MLP (same d, hidden k·h on every token, same
activation: the same active FLOPs) are jitted, warmed up, then timed alternately
`--reps` times each; the ratio of the two medians is the figure of merit, so load on
the machine hits both sides alike. Memory: the compiled executables' memory analysis
(temp = activations and scratch; parameters and their gradients are arguments and
outputs, E times larger for the MoE by design). FLOPs: counted analytically (XLA's
cost analysis counts a while-loop body once and ragged_dot on CPU densely; its figure
is kept in the JSON).

Rows are written to `<out>/layers_<backend>.json` as soon as they are measured; a
rerun skips the rows already there (`--force` re-measures), so the run can resume.
`<out>/layers_<backend>.md` is regenerated from the JSON at the end: the table, then the
issue's targets (ratios to the dense-equivalent in the same run), each marked met / not
met / not measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from moe_jax import layers  # noqa: E402
from moe_jax.layers import engines as engines_lib  # noqa: E402
from moe_jax.layers.engines import grouped  # noqa: E402

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


def parse_args(argv=None):
  gpu = jax.default_backend() != 'cpu'
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='benchmarks')
  p.add_argument('--quick', action='store_true', help='tiny sizes, 2 reps, writes *_quick.*')
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
  p.add_argument('--reps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--force', action='store_true', help='re-measure rows already in the JSON')
  a = p.parse_args(argv)
  if a.quick:
    a.tokens, a.d_model, a.hidden, a.reps, a.warmup = 512, 32, 64, 2, 1
    a.group_size, a.soft_group_size = 64, 64
    a.experts, a.ks = '8', '2'
  return a


def group_size(a, router):
  return a.soft_group_size if router == 'soft_moe' else a.group_size


def row_key(e, router, k, engine):
  return f'E={e}|{router}|k={k}|{engine}'


def make_moe(a, e, router, k):
  if router == 'tokens_choice':
    kw = dict(k=k, capacity_factor=a.capacity_factor)
  elif router == 'experts_choice':
    kw = dict(capacity_factor=float(k))     # c = k: the same expert compute as top-k
  else:
    kw = dict(num_slots=max(1, a.soft_group_size // e))   # slots = tokens
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


def moe_loss_fn(layer, engine):
  """`engine`: the engine object the layer runs with."""
  layer.engine = engine
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x, ct):
    model = nnx.merge(graphdef, params, rest)
    y, aux = model(x)
    return jnp.sum(y.astype(jnp.float32) * ct) + sum(aux['losses'].values())
  return loss, params


def dense_loss_fn(a, hidden, key):
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


def compile_step(loss, params, x, ct):
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  compiled = step.lower(params, x, ct).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  info = dict(temp_bytes=int(mem.temp_size_in_bytes), arg_bytes=int(mem.argument_size_in_bytes),
              out_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
              xla_flops=float((cost or {}).get('flops', float('nan'))))
  info['peak_bytes'] = info['temp_bytes'] + info['arg_bytes'] + info['out_bytes'] - info['alias_bytes']
  return (lambda: compiled(params, x, ct)), info


def analytic_flops(a, e, router, k, engine, layer, x):
  """Forward+backward FLOPs (3× forward): useful = the dense-equivalent's; executed = what
  the engine computes, padding and one-hot einsums included."""
  t, s, d, h = a.tokens, group_size(a, router), a.d_model, a.hidden
  per_row = 2 * 2 * d * h                      # one token through one expert, forward
  kk = 1 if router == 'soft_moe' else k
  useful = 3 * (t * kk * per_row + 2 * t * d)  # + biases
  gate = 2 * t * d * e
  if router == 'soft_moe':
    c = layer.router.num_slots
    slots = e * c
    rows, extra = (t // s) * slots, 3 * 2 * t * slots * d    # logits, dispatch, combine
  else:
    r = layer.router(x.reshape(-1, s, d))
    c = r.capacity
    rows, extra = (t // s) * e * c, 0
    if engine.name == 'einsum':
      extra = 2 * 2 * t * e * c * d
    elif engine.name == 'dropless':
      lay = engine.layout(r, e)
      if lay['tile']:
        rows = int(jnp.sum((lay['group_sizes'] + lay['tile'] - 1) // lay['tile'])) * lay['tile']
      else:
        rows = t * k
  executed = 3 * (rows * per_row + gate + extra)
  return useful, executed, c


def time_pair(fn_a, fn_b, reps, warmup):
  for _ in range(warmup):
    jax.block_until_ready(fn_a()); jax.block_until_ready(fn_b())
  ta, tb, ca, cb = [], [], [], []
  for _ in range(reps):
    for fn, ts, cs in ((fn_a, ta, ca), (fn_b, tb, cb)):
      c0, t0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(fn())
      ts.append(time.perf_counter() - t0)
      cs.append(time.process_time() - c0)
  return ta, tb, ca, cb


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
  dense_fn, dense_info = compile_step(dloss, dparams, x, ct)
  load0 = os.getloadavg()[0]
  tm, td, cm, cd = time_pair(moe_fn, dense_fn, a.reps, a.warmup)
  useful, executed, c = analytic_flops(a, e, router, k, layer.engine, layer, x)
  ms, ds = statistics.median(tm), statistics.median(td)
  return dict(E=e, router=router, k=k, engine=engine, S=s, C=c, moe_ms=1e3 * ms, dense_ms=1e3 * ds,
              time_ratio=ms / ds, moe_times=tm, dense_times=td, moe_cpu=cm, dense_cpu=cd,
              min_ratio=min(tm) / min(td), cpu_ratio=statistics.median(cm) / statistics.median(cd),
              moe_mem=moe_info, dense_mem=dense_info,
              temp_ratio=moe_info['temp_bytes'] / max(dense_info['temp_bytes'], 1),
              useful_flops=useful, executed_flops=executed,
              tflops=useful / ms / 1e12, dense_tflops=useful / ds / 1e12,
              load=[load0, os.getloadavg()[0]])


def config_of(a):
  keys = ('tokens', 'group_size', 'soft_group_size', 'd_model', 'hidden', 'capacity_factor',
          'dtype', 'tile', 'dropless_impl', 'reps')
  return dict({k: getattr(a, k) for k in keys}, backend=jax.default_backend(),
              device=jax.devices()[0].device_kind, jax=jax.__version__, cpus=os.cpu_count(),
              machine=platform.machine(), default_impl=grouped.default_impl())


def write_markdown(path, data):
  cfg = data['config']
  lines = [f"Backend {cfg['backend']} ({cfg['device']}, {cfg['cpus']} CPUs), jax {cfg['jax']}, "
           f"{cfg['tokens']} tokens in groups of S={cfg['group_size']} (Soft MoE: "
           f"{cfg['soft_group_size']}, slots = S), d={cfg['d_model']}, "
           f"h={cfg['hidden']}, {cfg['dtype']}, capacity factor {cfg['capacity_factor']}, "
           f"median of {cfg['reps']} forward+backward steps.", '',
           '| E | router | k | S | C | engine | MoE ms | dense ms | time × | temp MiB | temp × '
           '| peak MiB | GFLOP | executed × | TFLOP/s | load |',
           '|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  order = lambda r: (r['E'], list(ROUTER_ENGINES).index(r['router']), r['k'],
                     ENGINE_ORDER.index(r['engine']) if r['engine'] in ENGINE_ORDER else 99)
  for row in sorted(data['rows'].values(), key=order):
    lines.append(
        f"| {row['E']} | {row['router']} | {row['k']} | {row['S']} | {row['C']} | {row['engine']} | {row['moe_ms']:.0f} "
        f"| {row['dense_ms']:.0f} | **{row['time_ratio']:.2f}** "
        f"| {row['moe_mem']['temp_bytes'] / 2**20:.0f} | {row['temp_ratio']:.2f} "
        f"| {row['moe_mem']['peak_bytes'] / 2**20:.0f} | {row['useful_flops'] / 1e9:.1f} | {row['executed_flops'] / row['useful_flops']:.2f} "
        f"| {row['tflops']:.3f} | {row['load'][0]:.1f} |")
  lines += ['', '**Targets** (issue 5; ratios to the dense-equivalent of the same run):', '']
  lines += [f'- {text}: {verdict}' for text, verdict in targets(data['rows'])]
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def targets(rows: dict) -> list[tuple[str, str]]:
  """[(target, 'met (...)' | 'NOT met (...)' | 'not measured')] for the issue's targets.

  "Best engine" is the fastest engine of a (E, router, k), ablation variants included.
  Memory is compared on the compiled step's temp bytes (activations, scratch): the
  MoE's parameters and gradients are E/k times the dense-equivalent's by design, so
  the peak including them (the JSON's peak_bytes, the table's peak MiB) says nothing
  about the engines.
  """
  def best(e, router, k):
    cands = [r for r in rows.values() if (r['E'], r['router'], r['k']) == (e, router, k)]
    return min(cands, key=lambda r: r['time_ratio']) if cands else None

  def check(text, found, limit, value=lambda r: r['time_ratio'], unit='x time'):
    if not found or any(r is None for _, r in found):
      return text, 'not measured'
    parts = ', '.join(f'{label} {value(r):.2f}{unit} ({r["engine"]})' for label, r in found)
    ok = all(value(r) <= limit for _, r in found)
    return text, ('met' if ok else 'NOT met') + f': {parts}'

  out = [check('top-2 token choice (cf 1.25), best engine <= 1.5x at E = 8, 64, 256',
               [(f'E={e}', best(e, 'tokens_choice', 2)) for e in (8, 64, 256)], 1.5)]
  dropless = [(f'E={e} k={k}', rows.get(row_key(e, 'tokens_choice', k, 'dropless')))
              for e in (8, 64) for k in (1, 2)]
  out.append(check('dropless <= 1.3x at E = 8, 64', dropless, 1.3))
  out.append(check('Soft MoE (slots = tokens), best engine <= 1.5x',
                   [(f'E={e}', best(e, 'soft_moe', 1)) for e in (8, 64, 256)], 1.5))
  out.append(check('best engine (top-2 token choice) activation memory <= 2x dense at E = 256',
                   [('E=256', best(256, 'tokens_choice', 2))], 2.0,
                   value=lambda r: r['temp_ratio'], unit='x temp'))
  return out


def main(argv=None):
  a = parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  stem = os.path.join(a.out, f"layers_{jax.default_backend()}{'_quick' if a.quick else ''}")
  data = dict(config=config_of(a), rows={})
  if os.path.exists(stem + '.json'):
    with open(stem + '.json') as f:
      old = json.load(f)
    same = lambda c: {k: v for k, v in c.items() if k not in ('device', 'reps')}
    if same(old['config']) != same(data['config']):
      sys.exit(f'{stem}.json was measured with another configuration; delete it or use --out.')
    data['rows'] = old['rows']
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
                f"x{row['time_ratio']:.2f}  temp x{row['temp_ratio']:.2f}  load {row['load'][0]:.1f}",
                flush=True)
          with open(stem + '.json.tmp', 'w') as f:
            json.dump(data, f, indent=1)
          os.replace(stem + '.json.tmp', stem + '.json')
  write_markdown(stem + '.md', data)
  for text, verdict in targets(data['rows']):
    print(f'{text}: {verdict}')
  print(f'wrote {stem}.json and {stem}.md')


if __name__ == '__main__':
  main()

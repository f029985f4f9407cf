"""Runs named checks in a subprocess with N simulated CPU devices and collects results.

A check script defines functions `check_<name>()` that raise on failure; `run_checks`
calls them in order (one process, one jax start-up) and prints one JSON line
`{name: "ok" | "error text"}`. The pytest side (`run_script`) starts the script with
XLA_FLAGS set before jax is imported and returns that dict.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import traceback

MARK = 'CHECK-RESULTS:'
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_checks(namespace: dict) -> None:
  results, cpu_seconds = {}, {}
  for name, fn in namespace.items():
    if name.startswith('check_') and callable(fn):
      start = _cpu()
      try:
        fn()
        results[name[len('check_'):]] = 'ok'
      except Exception:   # report every failure, keep going
        results[name[len('check_'):]] = traceback.format_exc(limit=6)
      cpu_seconds[name[len('check_'):]] = round(_cpu() - start, 1)
  print('CPU seconds per check:', cpu_seconds, flush=True)
  print(MARK + json.dumps(results), flush=True)


def _cpu() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def run_script(script: str, num_devices: int = 8, timeout: int = 600) -> dict:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'parallel', script)],
                        capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
  for line in proc.stdout.splitlines():
    if line.startswith(MARK):
      return json.loads(line[len(MARK):])
  raise RuntimeError(f'{script} crashed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n'
                     f'{proc.stderr[-5000:]}')

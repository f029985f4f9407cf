"""Run CPU training and benchmarks under TCMalloc (or jemalloc) when it is installed.

XLA:CPU allocates each step's temporary buffers afresh. glibc's malloc hands large
blocks back to the kernel when they are freed (mmap / munmap), so the next step
page-faults them in again and the kernel zero-fills every page: 30-40% of an MoE
layer step on this project's 2-core machine, 1.45x on the whole `make demo`.
TCMalloc keeps freed memory for reuse. The library must be loaded before the process
starts (`LD_PRELOAD`), so an entry point calls, first thing,

    from moe_jax import allocator
    allocator.use_fast_allocator()     # re-executes the process once, with LD_PRELOAD

and later logs `allocator.describe()`. Nothing happens when a fast allocator is already
loaded, when none is installed (Debian: `apt-get install libtcmalloc-minimal4`), off
Linux, after one attempt (the environment variable `MOE_JAX_ALLOCATOR_REEXEC` marks
it), or with `MOE_JAX_ALLOCATOR=system`. The re-executed process keeps its PID, argv
and environment, so schedulers and `jax.distributed` see the same process.
"""
from __future__ import annotations

import os
import sys
import sysconfig

GUARD_ENV = 'MOE_JAX_ALLOCATOR_REEXEC'
CHOICE_ENV = 'MOE_JAX_ALLOCATOR'      # 'auto' (default) or 'system' (never re-execute)
# Preference order: TCMalloc (gperftools' minimal build, Debian libtcmalloc-minimal4),
# full TCMalloc, jemalloc.
LIBRARIES = ('libtcmalloc_minimal.so.4', 'libtcmalloc.so.4', 'libjemalloc.so.2')
KNOWN = {'tcmalloc': 'tcmalloc', 'jemalloc': 'jemalloc'}
INSTALL_HINT = 'sudo apt-get install -y libtcmalloc-minimal4'


def _library_dirs() -> list[str]:
  arch = sysconfig.get_config_var('MULTIARCH') or ''
  dirs = [f'/usr/lib/{arch}', f'/lib/{arch}'] if arch else []
  return dirs + ['/usr/lib64', '/usr/lib', '/usr/local/lib']


def find_library() -> str | None:
  """Path of the first installed fast allocator of `LIBRARIES`, or None."""
  for name in LIBRARIES:
    for d in _library_dirs():
      path = os.path.join(d, name)
      if os.path.isfile(path):
        return path
  return None


def active() -> str | None:
  """'tcmalloc' or 'jemalloc' when that allocator is loaded in this process, else None."""
  try:
    with open('/proc/self/maps') as f:
      maps = f.read()
  except OSError:
    return None
  for key, name in KNOWN.items():
    if f'lib{key}' in maps:
      return name
  return None


def describe() -> str:
  """One line for the log: which allocator this process runs with, and why."""
  name = active()
  if name:
    return f'{name} (LD_PRELOAD={os.environ.get("LD_PRELOAD", "")})'
  if os.environ.get(CHOICE_ENV, 'auto') == 'system':
    return f'system malloc ({CHOICE_ENV}=system)'
  if sys.platform == 'linux' and find_library() is None:
    return f'system malloc (no TCMalloc installed: {INSTALL_HINT} makes CPU steps faster)'
  return 'system malloc'


def use_fast_allocator(argv: list[str] | None = None) -> None:
  """Re-executes this Python process once with a fast allocator preloaded, if one is
  installed and none is loaded yet; returns (doing nothing) otherwise.

  Call it at the very start of a `__main__` entry point, before anything worth keeping
  has happened (imports are redone, threads and files are dropped by exec). Never call
  it from library code or tests.

  Args:
    argv: the command line to run again; default `sys.orig_argv` (interpreter options
      and `-m module` included).
  """
  if sys.platform != 'linux' or os.environ.get(GUARD_ENV):
    return
  if os.environ.get(CHOICE_ENV, 'auto') == 'system' or active():
    return
  path = find_library()
  if path is None:
    return
  env = dict(os.environ)
  env[GUARD_ENV] = '1'
  env['LD_PRELOAD'] = ':'.join(p for p in (path, env.get('LD_PRELOAD', '')) if p)
  # gperftools prints a line for every allocation over 1 GiB (large expert buffers).
  env.setdefault('TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD', str(1 << 40))
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, list(argv or sys.orig_argv), env)
  except OSError:
    return   # could not exec: carry on with the system allocator

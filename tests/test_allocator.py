"""The entry points re-execute once under TCMalloc when it is installed, say so, and
leave processes alone otherwise (opt-out, already loaded, guard set)."""
import os
import subprocess
import sys

import pytest

from moe_jax import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ('import os, sys; from moe_jax import allocator; allocator.use_fast_allocator(); '
         'print(allocator.active(), os.environ.get(allocator.GUARD_ENV), sys.argv[1:], '
         'os.environ.get("LD_PRELOAD", "").count("malloc"), sep="|")')


def run(*args, **env):
  base = {k: v for k, v in os.environ.items()
          if k not in (allocator.GUARD_ENV, allocator.CHOICE_ENV, 'LD_PRELOAD')}
  out = subprocess.run([sys.executable, '-c', PROBE, *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(base, **env))
  assert out.returncode == 0, out.stderr
  return out.stdout.strip().split('|')


needs_library = pytest.mark.skipif(allocator.find_library() is None or sys.platform != 'linux',
                                   reason='no TCMalloc / jemalloc installed')


@needs_library
def test_reexecutes_once_with_the_library_preloaded_and_keeps_the_arguments():
  name, guard, args, preloads = run('--flag=1', 'x y')
  assert name in ('tcmalloc', 'jemalloc') and guard == '1'
  assert args == "['--flag=1', 'x y']" and preloads.strip() == '1'


@needs_library
def test_opt_out_and_guard_leave_the_process_alone():
  assert run(**{allocator.CHOICE_ENV: 'system'})[:2] == ['None', 'None']
  assert run(**{allocator.GUARD_ENV: '1'})[:2] == ['None', '1']
  # Already preloaded: no second exec (the guard stays unset), nothing preloaded twice.
  name, guard, _, preloads = run(LD_PRELOAD=allocator.find_library())
  assert name != 'None' and guard == 'None' and preloads.strip() == '1'


def test_describe_names_the_allocator_or_how_to_install_one():
  text = allocator.describe()
  assert text.startswith(('tcmalloc', 'jemalloc', 'system malloc'))
  if allocator.active() is None and allocator.find_library() is None:
    assert 'apt-get install' in text

"""Importing the package and loading a config must not start the XLA backend:
`jax.distributed.initialize` (multi-host runs) has to come first in `main`."""
import subprocess
import sys

CHECK = r'''
from jax._src import xla_bridge
def refuse(*args, **kwargs):
  raise SystemExit('the XLA backend was initialised at import time')
xla_bridge.backends = refuse
import importlib.util
import moe_jax.layers, moe_jax.models, moe_jax.parallel, moe_jax.routing, moe_jax.train.config_lib
for path in ('configs/vit/fashion_mnist.py', 'configs/vit/imagenet.py'):
  spec = importlib.util.spec_from_file_location('config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.get_config(None)
print('ok')
'''


def test_imports_and_configs_leave_the_backend_alone():
  out = subprocess.run([sys.executable, '-c', CHECK], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr[-2000:] + out.stdout

"""Multi-host mechanics: 2 local processes × 4 CPU devices, coordinator on 127.0.0.1."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.parallel._harness import ROOT


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.xdist_group('parallel_multiprocess')
def test_two_processes_train_identically():
  """Both processes report the same losses, equal to one device training on the whole batch."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  port = str(_free_port())
  script = os.path.join(ROOT, 'tests', 'parallel', 'multiprocess_worker.py')
  procs = [subprocess.Popen([sys.executable, script, str(i), '2', port], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=300)
      lines = [l for l in out.splitlines() if l.startswith('RESULT:')]
      assert p.returncode == 0 and lines, f'exit {p.returncode}\n{out[-2000:]}\n{err[-4000:]}'
      results.append(json.loads(lines[0][len('RESULT:'):]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [r['process'] for r in results] == [0, 1]
  assert results[0]['sharded'] == results[1]['sharded']           # bitwise: one global program
  np.testing.assert_allclose(results[0]['sharded'], results[0]['single'], rtol=1e-5, atol=1e-6)
  assert results[0]['sharded'][-1] < results[0]['sharded'][0]     # it trains
  print('losses (2 processes x 4 devices, 1 device):', results[0]['sharded'], results[0]['single'])

"""Multi-host: 2 local processes × 4 CPU devices, coordinator on 127.0.0.1.

One test (one start-up of the 2 processes) for a hand-written training loop and for the
ViT trainer, to keep the suite's time down.
"""
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
def test_two_processes_train_identically(tmp_path):
  """Both processes report the same losses, equal to one device training on the whole batch.

  Then both run the ViT trainer on mesh (data=2, expert=4) with a shared workdir and
  report identical train and test losses.
  """
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  port = str(_free_port())
  script = os.path.join(ROOT, 'tests', 'parallel', 'multiprocess_worker.py')
  procs = [subprocess.Popen([sys.executable, script, str(i), '2', port, str(tmp_path / 'wd')], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=900)
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
  t0, t1 = results[0]['trainer'], results[1]['trainer']
  assert t0 == t1, (t0, t1)                                        # every process, same numbers
  assert len(t0['train_loss']) == 3 and np.all(np.isfinite(t0['train_loss']))
  assert (tmp_path / 'wd' / 'results.json').exists()
  print('trainer on 2 processes x 4 devices: train losses', t0['train_loss'], 'test loss',
        t0['test_loss'])

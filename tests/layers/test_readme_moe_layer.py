"""The python blocks of README.md's "The MoE layer" section run, in order, in a fresh
interpreter, exactly as a reader would paste them (so the docs cannot rot)."""
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
SECTION = '## The MoE layer'


def readme_blocks() -> list[str]:
  text = (ROOT / 'README.md').read_text()
  start = text.index(SECTION)
  end = text.find('\n## ', start + len(SECTION))
  section = text[start:] if end < 0 else text[start:end]
  return re.findall(r'```python\n(.*?)```', section, flags=re.S)


def test_section_has_examples_of_every_router_and_the_routing_api():
  code = '\n'.join(readme_blocks())
  for needle in ("router='tokens_choice'", "router='experts_choice'", "router='soft_moe'",
                 'routing.tokens_choice(', '.dense()', '.aux_losses', '.metrics',
                 'compute_capacity(', "aux['losses']"):
    assert needle in code, needle


def test_readme_moe_layer_section_runs():
  blocks = readme_blocks()
  assert len(blocks) >= 4
  script = '\n\n'.join(blocks) + '\nprint("README OK")\n'
  env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL='3',
             # Fast compilation of these tiny programs; the numbers do not change.
             XLA_FLAGS='--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'README OK' in proc.stdout

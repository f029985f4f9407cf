"""Communication volume of a compiled program: collectives read from its HLO text.

Under SPMD the compiled HLO is the per-device program, so the shapes of its
collectives are per-device buffers:

    compiled = jax.jit(f).lower(*args).compile()
    collective_bytes(compiled.as_text())     # {'all-to-all': [6144, 6144], ...}

For the expert-parallel MoE layer each all_to_all moves the device's whole expert
buffer (`all_to_all_bytes`), of which the fraction (n-1)/n leaves the device
(n = |expert|); the forward pass has two (dispatch, return), the backward two more.
"""
from __future__ import annotations

import math
import re

DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
               'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16,
               'f8e4m3fn': 1, 'f8e5m2': 1}
COLLECTIVES = ('all-to-all', 'ragged-all-to-all', 'all-gather', 'all-reduce', 'reduce-scatter',
               'collective-permute')
_ARRAY = re.compile(r'\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]')
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+(' + '|'.join(COLLECTIVES) +
                    r')(?:-start)?\(')


def _shape_bytes(shape_text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype in DTYPE_BYTES:
      total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total


def collective_bytes(hlo_text: str) -> dict[str, list[int]]:
  """Per-device result bytes of every collective instruction, by op name.

  A tuple-shaped collective (XLA splits a tiled all_to_all into one operand per peer)
  counts once, with the sum of its parts. Async `-start` forms count, `-done` do not.
  """
  out: dict[str, list[int]] = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if m:
      out.setdefault(m.group(2), []).append(_shape_bytes(m.group(1)))
  return out


_TENSOR = re.compile(r'tensor<([0-9x]*)x?([a-z]+[0-9a-z]*)>')
_MLIR_BYTES = {'i1': 1, 'i8': 1, 'ui8': 1, 'i16': 2, 'f16': 2, 'bf16': 2, 'i32': 4, 'ui32': 4,
               'f32': 4, 'i64': 8, 'f64': 8}


def lowered_all_to_all_bytes(stablehlo_text: str) -> list[int]:
  """Per-device result bytes of each `stablehlo.all_to_all` of a lowered program.

  The dtype the program asks for, before the backend's own rewrites: XLA:CPU, for
  one, upcasts bfloat16 collectives to float32 in the compiled program.
  """
  out = []
  for line in stablehlo_text.splitlines():
    if 'stablehlo.all_to_all' in line and '->' in line:
      results = line.rsplit('->', 1)[1]
      total = 0
      for dims, dtype in _TENSOR.findall(results):
        total += _MLIR_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split('x') if d)
      out.append(total)
  return out


def all_to_all_bytes(*, groups: int, num_experts: int, capacity: int, d_model: int,
                     dtype_bytes: int = 4) -> int:
  """Per-device bytes of one all_to_all of the MoE layer: the buffer `[E, G, C, d]`.

  groups: routing groups on the device (examples per device by default); capacity: C
  (token choice: ceil(k·S·capacity_factor / E); Soft MoE: slots per expert). For token
  choice this is ≈ k · capacity_factor · tokens_per_device · d · bytes.
  """
  return num_experts * groups * capacity * d_model * dtype_bytes

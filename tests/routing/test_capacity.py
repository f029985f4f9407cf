"""compute_capacity: every convention against values worked out by hand.

Conventions (notes/routing-reference.md §0.1):
  vmoe        C = ceil(k·S·cf/E), rounded up to a multiple of 4
  flaxformer  C = max(round(cf·S/E), 4), k not multiplied in
  mesh-tf     C = max(floor(cf·S/E), 4), k not multiplied in
and ours (the default): ceil(k·S·cf/E), multiple_of=1, clipped to [1, S].
"""
import pytest

from moe_jax.routing import compute_capacity

VMOE = dict(rounding='ceil', multiple_of=4)
FLAXFORMER = dict(include_k=False, rounding='round', min_capacity=4)
MESH_TF = dict(include_k=False, rounding='floor', min_capacity=4)


@pytest.mark.parametrize('args, kwargs, expected', [
    # Default: ceil(k * S * cf / E).
    ((8, 4, 1.25), dict(k=1), 3),            # 2.5 -> 3 (and not 2.5000000000000004 trouble)
    ((8, 4, 1.25), dict(k=2), 5),            # 5.0 -> 5
    ((64, 8, 1.0), dict(k=2), 16),           # exactly k*S/E at cf=1
    ((10, 4, 2.0), dict(), 5),               # expert choice c=2: S*c/E
    ((10, 3, 1.0), dict(), 4),               # 3.33 -> 4
    ((4, 2, 4.0), dict(k=2), 4),             # 16 clipped to the S=4 tokens of a group
    ((4, 8, 0.1), dict(), 1),                # 0.05 -> ceil 1, never 0
    # vmoe: ceil then up to a multiple of 4.
    ((100, 8, 1.05), dict(k=2, **VMOE), 28),  # 26.25 -> 27 -> 28
    ((196, 32, 1.05), dict(k=2, **VMOE), 16),  # 12.86 -> 13 -> 16
    ((64, 8, 1.0), dict(k=2, **VMOE), 16),    # 16 already a multiple of 4
    # flaxformer: round, min 4, k ignored.
    ((100, 8, 1.25), dict(k=2, **FLAXFORMER), 16),   # 15.625 -> 16
    ((512, 8, 1.25), dict(k=2, **FLAXFORMER), 80),   # 80.0
    ((16, 8, 1.25), dict(k=2, **FLAXFORMER), 4),     # 2.5 -> 2 (Python round) -> min 4
    ((100, 8, 1.2), dict(k=1, **FLAXFORMER), 15),    # 15.0
    # mesh-tf: floor, min 4, k ignored.
    ((100, 8, 1.25), dict(k=2, **MESH_TF), 15),      # 15.625 -> 15
    ((10, 8, 1.25), dict(**MESH_TF), 4),             # 1.56 -> 1 -> min 4
    ((1024, 64, 2.0), dict(**MESH_TF), 32),          # eval cf 2.0
    # Megatron: ceil, k ignored.
    ((100, 8, 1.25), dict(k=2, include_k=False), 16),  # 15.625 -> 16
])
def test_capacity_conventions(args, kwargs, expected):
  assert compute_capacity(*args, **kwargs) == expected


@pytest.mark.parametrize('cf', [0, -1.0, None])
def test_bad_capacity_factor_raises(cf):
  with pytest.raises(ValueError, match='capacity_factor must be > 0'):
    compute_capacity(8, 4, cf)


def test_bad_rounding_and_multiple_raise():
  with pytest.raises(ValueError, match='rounding must be one of'):
    compute_capacity(8, 4, 1.0, rounding='up')
  with pytest.raises(ValueError, match='multiple_of must be >= 1'):
    compute_capacity(8, 4, 1.0, multiple_of=0)

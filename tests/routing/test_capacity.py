"""compute_capacity: every convention against values worked out by hand; CapacitySpec:
train / eval selection, explicit capacity, no factor, validation.

Conventions (stated in `moe_jax/routing/capacity.py`):
  vmoe        C = ceil(k·S·cf/E), rounded up to a multiple of 4
  flaxformer  C = max(round(cf·S/E), 4), k not multiplied in
  mesh-tf     C = max(floor(cf·S/E), 4), k not multiplied in
and ours (the default): ceil(k·S·cf/E), multiple_of=1, clipped to [1, S].
"""
import pytest

from moe_jax.errors import ConfigError
from moe_jax.routing import CapacitySpec, compute_capacity

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


def test_capacity_spec_train_eval_explicit_and_none():
  spec = CapacitySpec(capacity_factor=1.25, eval_capacity_factor=2.0)
  assert spec.slots(8, 4, k=2) == 5                       # ceil(2·8·1.25/4)
  assert spec.slots(8, 4, k=2, train=False) == 8          # ceil(2·8·2.0/4)
  assert CapacitySpec(capacity_factor=1.25).slots(8, 4, k=1, train=False) == 3   # eval = train
  # The conventions apply as in compute_capacity (flaxformer: k not multiplied in, round, min 4).
  flax = CapacitySpec(capacity_factor=1.25, capacity_include_k=False, capacity_rounding='round',
                      min_capacity=4)
  assert flax.slots(100, 8, k=2) == 16                    # 15.625 -> 16
  assert CapacitySpec(capacity_factor=1.05, capacity_multiple_of=4).slots(100, 8, k=2) == 28
  # An explicit capacity wins over the factor, in evaluation too unless eval_capacity is set.
  explicit = CapacitySpec(capacity_factor=1.0, eval_capacity_factor=4.0, capacity=3)
  assert explicit.slots(8, 4) == 3 and explicit.slots(8, 4, train=False) == 3
  assert CapacitySpec(capacity=3, eval_capacity=6).slots(8, 4, train=False) == 6
  # No factor, no capacity: every expert can take every token of the group.
  assert CapacitySpec().slots(10, 4, k=2) == 10
  assert CapacitySpec(eval_capacity_factor=1.0).slots(10, 4, k=2) == 10       # training
  assert CapacitySpec(eval_capacity_factor=1.0).slots(10, 4, k=2, train=False) == 5
  with pytest.raises(ValueError, match=r'capacity must be in \[1, 8\]'):
    CapacitySpec(capacity=9).slots(8, 4)


@pytest.mark.parametrize('kwargs, field', [
    (dict(capacity_factor=0.0), 'capacity_factor'),
    (dict(eval_capacity_factor=-1.0), 'eval_capacity_factor'),
    (dict(capacity=0), 'capacity'),
    (dict(eval_capacity=2.5), 'eval_capacity'),
    (dict(capacity_rounding='up'), 'capacity_rounding'),
    (dict(capacity_multiple_of=0), 'capacity_multiple_of'),
])
def test_capacity_spec_rejects_bad_values_naming_the_keyword(kwargs, field):
  with pytest.raises(ConfigError) as e:
    CapacitySpec(**kwargs)
  assert e.value.field == field

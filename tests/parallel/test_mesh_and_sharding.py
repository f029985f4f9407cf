"""Single-process parts of moe_jax.parallel: mesh config, specs, HLO parsing, no-mesh path."""
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from moe_jax import layers, parallel
from moe_jax.parallel import hlo_comm, ragged
from tests.parallel._harness import ROOT

MESH = AbstractMesh((2, 4, 1), parallel.MESH_AXES)


def test_mesh_shape_fills_one_axis():
  assert parallel.mesh_shape(dict(data=-1, expert=4), num_devices=8) == (2, 4, 1)
  assert parallel.mesh_shape(types.SimpleNamespace(data=2, expert=-1, model=2), 8) == (2, 2, 2)
  assert parallel.mesh_shape(None, num_devices=8) == (8, 1, 1)     # default: data parallel


@pytest.mark.parametrize('cfg, words', [
    (dict(data=2, expert=2), ['needs 4 devices', '8 are available', 'set one axis to -1']),
    (dict(data=3, expert=-1), ['does not divide the 8']),
    (dict(data=-1, expert=-1), ['at most one -1']),
    (dict(data=0, expert=8), ['sizes must be >= 1']),
])
def test_mesh_shape_errors(cfg, words):
  with pytest.raises(ValueError) as e:
    parallel.mesh_shape(cfg, num_devices=8)
  assert all(w in str(e.value) for w in words), str(e.value)


def test_make_mesh_rejects_unknown_axis_type():
  with pytest.raises(ValueError, match='axis_types'):
    parallel.make_mesh(dict(data=1, axis_types='manual'))


def test_fit_spec_drops_missing_and_size_one_axes():
  assert parallel.fit_spec(('expert', None, 'model'), (8, 3, 6), MESH) == P('expert', None, None)
  assert parallel.fit_spec((('data', 'expert'), None), (16, 3), MESH) == P(('data', 'expert'), None)
  assert parallel.fit_spec(None, (3,), MESH) == P()
  other = AbstractMesh((8,), ('x',))
  assert parallel.fit_spec(('expert', None), (8, 3), other) == P(None, None)
  with pytest.raises(ValueError, match=r"num_experts as a multiple .* config.mesh.expert"):
    parallel.fit_spec(('expert', None), (6, 3), MESH)


def test_layer_without_mesh_keeps_annotations_and_runs_single_device():
  layer = layers.MoeLayer(8, 4, 16, rngs=nnx.Rngs(0))
  assert parallel.active_mesh() is None
  assert layer.experts.w_in.get_metadata()['out_sharding'] == ('expert', None, 'model')
  assert len(layer.experts.w_in[...].sharding.device_set) == 1
  specs = parallel.partition_specs(layer, MESH)
  assert specs['experts']['w_out'].get_value() == P('expert', None, None)
  assert specs['experts']['b_in'].get_value() == P('expert', None)
  assert specs['router']['gate']['kernel'].get_value() == P()
  x = jax.random.normal(jax.random.key(0), (2, 4, 8))
  call = jax.jit(lambda m, x: m(x)[0])
  y = call(layer, x)
  # A mesh of one device is not "expert parallel": the same single-device path runs.
  with jax.set_mesh(parallel.make_mesh(dict(data=1), devices=jax.devices()[:1])):
    assert parallel.active_mesh() is None
    y1 = call(layer, x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y1))


def test_global_reductions_are_identity_outside_shard_map():
  x = {'a': jnp.arange(3.0)}
  assert parallel.batch_axes_in_context() == ()
  assert parallel.global_mean(x) is x and parallel.global_sum(x) is x


HLO = """
  %all-to-all = (f32[2,6,16]{2,1,0}, f32[2,6,16]{2,1,0}) all-to-all(%a, %b), channel_id=1
  %all-to-all.1 = bf16[8,10,32]{2,1,0} all-to-all(%c), channel_id=2, dimensions={0}
  ROOT %all-reduce.3 = f32[16,8]{1,0} all-reduce(%d), channel_id=3, to_apply=%add
  %ag = s32[4]{0} all-gather-start(%e), dimensions={0}
  %ag.done = s32[4]{0} all-gather-done(%ag)
  %fusion = f32[2,6,16]{2,1,0} fusion(%all-to-all), kind=kLoop
"""
STABLEHLO = """
    %211 = "stablehlo.all_to_all"(%210) <{concat_dimension = 1 : i64}> : (tensor<8x10x32xbf16>) -> tensor<2x40x32xbf16>
    %212 = "stablehlo.add"(%211, %211) : (tensor<2x40x32xbf16>, tensor<2x40x32xbf16>) -> tensor<2x40x32xbf16>
"""


def test_collective_bytes_from_hlo_text():
  got = hlo_comm.collective_bytes(HLO)
  assert got == {'all-to-all': [2 * 2 * 6 * 16 * 4, 8 * 10 * 32 * 2], 'all-reduce': [16 * 8 * 4],
                 'all-gather': [4 * 4]}
  assert hlo_comm.lowered_all_to_all_bytes(STABLEHLO) == [2 * 40 * 32 * 2]


def test_all_to_all_bytes_formula():
  # E=8 experts, 2 groups of S=64 tokens, k=2, cf=1.25 -> C = ceil(2*64*1.25/8) = 20, d=128.
  assert hlo_comm.all_to_all_bytes(groups=2, num_experts=8, capacity=20, d_model=128) == 163840
  assert hlo_comm.all_to_all_bytes(groups=2, num_experts=8, capacity=20, d_model=128,
                               dtype_bytes=2) == 81920


def test_ragged_impl_names():
  assert ragged.resolve_impl('padded') == 'padded'
  assert ragged.resolve_impl('auto') == ('padded' if jax.default_backend() == 'cpu' else 'ragged')
  with pytest.raises(ValueError, match='impl must be'):
    ragged.resolve_impl('nccl')


def test_initialize_distributed_is_a_no_op_on_one_host():
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'JAX_COORD', 'OMPI_'))}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  out = subprocess.run(
      [sys.executable, '-c', 'from moe_jax import parallel; import jax; '
       'print(parallel.initialize_distributed(), jax.process_count())'],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
  assert out.stdout.split()[-2:] == ['False', '1'], out.stderr[-2000:]


def test_unsharded_experts_have_no_annotation():
  experts = layers.Experts(4, 8, 16, shard_experts=False, rngs=nnx.Rngs(0))
  assert 'out_sharding' not in experts.w_in.get_metadata()
  specs = parallel.partition_specs(experts, MESH)
  assert all(v.get_value() == P() for v in jax.tree.leaves(
      specs, is_leaf=lambda v: isinstance(v, nnx.Variable)))

"""Expert parallelism on 8 simulated CPU devices (one subprocess per check script)."""
import pytest

from tests.parallel._harness import run_script

EQUIVALENCE = ['tokens_choice_gather', 'tokens_choice_einsum', 'experts_choice_gather',
               'experts_choice_einsum', 'soft_moe_einsum', 'soft_moe_gather',
               'tensor_parallel_glu', 'auto_mesh_group_size']


@pytest.fixture(scope='module')
def equivalence():
  return run_script('checks_equivalence.py')


@pytest.mark.slow
@pytest.mark.xdist_group('parallel_equivalence')
@pytest.mark.parametrize('name', EQUIVALENCE)
def test_sharded_layer_equals_single_device(equivalence, name):
  """Forward, aux losses, metrics and all gradients match one device to 1e-5 (float32)."""
  assert set(EQUIVALENCE) <= set(equivalence), sorted(equivalence)
  assert equivalence[name] == 'ok', equivalence[name]


SHARDING = ['compiled_all_to_all_no_weight_all_gather', 'each_device_holds_its_experts',
            'shard_module_and_specs', 'restore_onto_different_mesh',
            'layer_inside_a_user_shard_map', 'clear_errors',
            'global_mean_and_sum', 'router_state_identical_on_all_devices',
            'noise_differs_across_devices', 'token_ids_reach_the_router', 'ragged_exchange']


@pytest.fixture(scope='module')
def sharding():
  return run_script('checks_sharding.py')


@pytest.mark.slow
@pytest.mark.xdist_group('parallel_sharding')
@pytest.mark.parametrize('name', SHARDING)
def test_sharding_collectives_and_errors(sharding, name):
  """See the docstring of each `check_<name>` in checks_sharding.py."""
  assert set(SHARDING) <= set(sharding), sorted(sharding)
  assert sharding[name] == 'ok', sharding[name]


DROPLESS = ['dropless_expert8', 'dropless_data2_expert4_emulated_exchange',
            'dropless_tensor_parallel_glu', 'dropless_ragged_dot_local_experts',
            'dropless_experts_choice_falls_back_to_buffers', 'dropless_ragged_all_to_all_lowers']


@pytest.fixture(scope='module')
def dropless():
  return run_script('checks_dropless.py')


@pytest.mark.slow
@pytest.mark.xdist_group('parallel_dropless')
@pytest.mark.parametrize('name', DROPLESS)
def test_dropless_under_a_mesh_equals_single_device(dropless, name):
  """Dropless engine, ragged exchange (padded all_to_all on CPU): forward, aux, metrics and
  gradients match single-device dropless to 1e-5; ragged_all_to_all only lowers on CPU."""
  assert set(DROPLESS) <= set(dropless), sorted(dropless)
  assert dropless[name] == 'ok', dropless[name]

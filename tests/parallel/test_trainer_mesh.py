"""The ViT trainer on 8 simulated CPU devices (one subprocess per check script)."""
import pytest

from tests.parallel._harness import run_script

LOSSES = ['tokens_choice', 'experts_choice', 'soft_moe', 'lm_span_corruption_switch',
          'lm_causal_tokens_choice']


@pytest.fixture(scope='module')
def losses():
  return run_script('checks_trainer_losses.py')


@pytest.mark.slow
@pytest.mark.xdist_group('parallel_trainer_losses')
@pytest.mark.parametrize('name', LOSSES)
def test_mesh_training_matches_one_device(losses, name):
  """4 steps of a tiny ViT or LM on mesh (data=2, expert=4) log the 1-device losses (1e-4)."""
  assert set(LOSSES) <= set(losses), sorted(losses)
  assert losses[name] == 'ok', losses[name]


CHECKPOINT = ['checkpoint_restores_onto_other_meshes', 'deepseek_bias_identical_on_all_devices',
              'clear_errors']


@pytest.fixture(scope='module')
def checkpoint():
  return run_script('checks_trainer_checkpoint.py')


@pytest.mark.slow
@pytest.mark.xdist_group('parallel_trainer_checkpoint')
@pytest.mark.parametrize('name', CHECKPOINT)
def test_trainer_checkpoints_and_router_state(checkpoint, name):
  """See the docstring of each `check_<name>` in checks_trainer_checkpoint.py."""
  assert set(CHECKPOINT) <= set(checkpoint), sorted(checkpoint)
  assert checkpoint[name] == 'ok', checkpoint[name]

"""Checkpoints: exact resume after SIGKILL, SIGTERM stop, damage fallback, layouts, evaluate.

The real training loop runs in-process on TinyNet (conftest) over the tiny
synthetic IDX set: 48 examples, batch 8 -> 6 steps per epoch, 2 epochs, a
checkpoint every 4 steps and at each epoch's end (steps 4, 6, 8, 12; the
newest 3 are kept). Only the SIGKILL test needs a child process.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import chex
import ml_collections
import numpy as np
import pytest

from conftest import REPO, TinyNet
import jax

from gnet_jax import checkpoint, cli, evaluate, input_pipeline, parallel, preemption
from gnet_jax import state as state_lib, train

SPEC = input_pipeline.dataset_spec('fashion_mnist')
TIMING_KEYS = ('examples_per_sec', 'seconds')
OVERRIDES = dict(data_source='idx', batch_size=8, train_examples=48, num_epochs=2,
                 checkpoint_every_steps=4, parallelism='none', progress=False)


def make_config(idx_dir, **overrides) -> ml_collections.ConfigDict:
  from configs import quickstart
  config = quickstart.get_config()
  config.data_dir = str(idx_dir)
  for key, value in {**OVERRIDES, **overrides}.items():
    config[key] = value
  return config


def model_for(config):
  return TinyNet(aux_heads=config.aux_weight > 0)


def run_loop(workdir, idx_dir, after_step=None, **overrides):
  """The loop through the command's error handling: returns the exit status."""
  config = make_config(idx_dir, **overrides)
  return cli.run_command(lambda: train.train_and_evaluate(
      config, workdir, model=model_for(config), after_step=after_step) and 0)


def target_for(config):
  model = model_for(config)
  return state_lib.create_train_state(config, SPEC, model, state_lib.create_optimizer(config))


def final_state(workdir, target):
  state, _, step = checkpoint.restore_from_workdir(workdir, target)
  return state, step


def history(workdir):
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def file_list(folder):
  return sorted(str(p.relative_to(folder)) for p in folder.rglob('*'))


@pytest.fixture(scope='module')
def reference(tmp_path_factory, idx_dir):
  """One uninterrupted run, shared by several tests (do not modify: copy it)."""
  workdir = tmp_path_factory.mktemp('reference')
  assert run_loop(workdir, idx_dir) == 0
  return workdir


@pytest.fixture
def reference_copy(reference, tmp_path):
  shutil.copytree(reference, tmp_path / 'run')
  return tmp_path / 'run'


@pytest.fixture(scope='module')
def target(idx_dir):
  return target_for(make_config(idx_dir))


KILL_CHILD = '''
import os, signal, sys, time
from pathlib import Path
sys.path[:0] = [{repo!r}, {tests!r}]
import test_checkpoint as tc
workdir = Path({workdir!r})

def kill_after_10(step):
  if step == 10:  # a crash at a known point: once checkpoint 8 is committed
    deadline = time.monotonic() + 120
    while not (workdir / 'checkpoints' / '8').is_dir() and time.monotonic() < deadline:
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)

tc.run_loop(workdir, Path({idx!r}), after_step=kill_after_10)
'''


def test_reference_run_keeps_newest_checkpoints(reference):
  assert sorted(int(p.name) for p in (reference / 'checkpoints').iterdir()
                if p.name.isdigit()) == [6, 8, 12]
  assert [row['epoch'] for row in history(reference)] == [1, 2]
  assert json.loads((reference / 'config.json').read_text())['checkpoint_every_steps'] == 4


def test_resume_after_sigkill_is_exact(reference, idx_dir, tmp_path, capsys):
  workdir = tmp_path / 'killed'
  # Killed right after step 10 (epoch 2, step 4 of 6); the newest checkpoint is step 8.
  killed = subprocess.run([sys.executable, '-c', KILL_CHILD.format(
      repo=str(REPO), tests=str(REPO / 'tests'), workdir=str(workdir), idx=str(idx_dir))],
      capture_output=True, text=True, timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert [row['epoch'] for row in history(workdir)] == [1]
  assert run_loop(workdir, idx_dir) == 0
  assert 'resuming from the checkpoint at step 8 (epoch 2, step 2 of 6)' in capsys.readouterr().out
  target = target_for(make_config(idx_dir))
  state, step = final_state(workdir, target)
  expected, expected_step = final_state(reference, target)
  assert step == expected_step == 12
  chex.assert_trees_all_equal(state, expected)  # params, optimizer, rng, metric sums: bitwise
  assert history(workdir) == history(reference)


def test_finished_run_rerun_does_nothing(reference_copy, idx_dir, capsys):
  before = {p: p.read_bytes() for p in (reference_copy / 'metrics.jsonl',
                                        reference_copy / 'config.json')}
  listing = file_list(reference_copy)
  config = make_config(idx_dir)
  summary = train.train_and_evaluate(config, reference_copy, model=model_for(config))
  assert 'nothing to do' in capsys.readouterr().out
  assert summary['epoch'] == 2
  assert {p: p.read_bytes() for p in before} == before
  assert file_list(reference_copy) == listing


@pytest.mark.parametrize('key,value', [('image_size', 32), ('learning_rate', 0.5),
                                       ('dataset', 'mnist')])
def test_config_mismatch_is_refused(reference_copy, idx_dir, capsys, key, value):
  config_json = (reference_copy / 'config.json').read_text()
  code = run_loop(reference_copy, idx_dir, **{key: value})
  err = capsys.readouterr().err
  assert code == 2
  assert err.startswith('error: ') and key in err and 'different config' in err, err
  assert 'Traceback' not in err
  assert (reference_copy / 'config.json').read_text() == config_json


def test_allowed_config_changes():
  saved = checkpoint.config_dict(make_config('/a'))
  changed = make_config('/b', num_epochs=5, progress=True, checkpoint_every_steps=0,
                        max_checkpoints=1, eval_batch_size=16, parallelism='pmap',
                        kernels='xla', log_every_steps=0, profile_steps=3,
                        compilation_cache='off')
  assert checkpoint.config_differences(saved, changed) == []
  assert checkpoint.config_differences(saved, make_config('/a', seed=1, momentum=0.5,
                                                         bias_init='torch')) == [
      'bias_init', 'momentum', 'seed']


# ----------------------------------------------------------------------------- damage


def _biggest_file(folder):
  return max((p for p in folder.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def _zero(path):
  path.write_bytes(b'\0' * path.stat().st_size)


DAMAGE = {
    'deleted_file': lambda d: _biggest_file(d / 'state').unlink(),
    'deleted_manifests': lambda d: [p.unlink() for p in d.rglob('manifest.ocdbt')],
    'truncated_file': lambda d: _biggest_file(d / 'state').write_bytes(
        _biggest_file(d / 'state').read_bytes()[:1000]),
    'zeroed_files': lambda d: [_zero(p) for p in d.rglob('*') if p.is_file()],
    'half_written': lambda d: shutil.rmtree(d / 'state'),
    'empty_directory': lambda d: [shutil.rmtree(d), d.mkdir()],
}


@pytest.mark.parametrize('kind', sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back(reference_copy, target, idx_dir, capsys, kind):
  newest = reference_copy / 'checkpoints' / '12'
  DAMAGE[kind](newest)
  damaged_files = file_list(newest)
  manager = checkpoint.open_manager(reference_copy, read_only=True)
  try:
    state, _, step, damaged = checkpoint.restore(manager, target, make_config(idx_dir))
  finally:
    manager.close()
  err = capsys.readouterr().err
  assert step == 8 and int(state.step) == 8 and damaged == [12]
  assert 'warning: checkpoint at step 12' in err and 'cannot be read' in err, err
  assert newest.is_dir() and file_list(newest) == damaged_files  # nothing deleted


def test_leftover_temporary_folder_is_ignored_and_kept(reference_copy, target, idx_dir):
  tmp = reference_copy / 'checkpoints' / '16.orbax-checkpoint-tmp-123'
  shutil.copytree(reference_copy / 'checkpoints' / '12', tmp)
  shutil.rmtree(tmp / 'state')
  manager = checkpoint.open_manager(reference_copy, read_only=True)
  try:
    _, _, step, damaged = checkpoint.restore(manager, target, make_config(idx_dir))
  finally:
    manager.close()
  assert (step, damaged) == (12, [])
  assert tmp.is_dir()


def test_no_readable_checkpoint_is_a_clear_error(reference_copy, idx_dir, capsys):
  folder = reference_copy / 'checkpoints'
  for step in ('6', '8', '12'):
    for p in (folder / step).rglob('manifest.ocdbt'):
      p.unlink()
  listing = file_list(reference_copy)
  code = run_loop(reference_copy, idx_dir)
  err = capsys.readouterr().err
  assert code == 2
  assert 'error: no readable checkpoint' in err and 'nothing was deleted' in err, err
  assert file_list(reference_copy) == listing


# ----------------------------------------------------------------------------- SIGTERM, layouts


@pytest.fixture(scope='module')
def pmap_run(tmp_path_factory, idx_dir):
  """One epoch under pmap on 4 CPU devices, stopped by SIGTERM after step 3, then resumed."""
  workdir = tmp_path_factory.mktemp('pmap')
  config = make_config(idx_dir, parallelism='pmap', num_devices=4, num_epochs=1)
  sigterm_at_3 = lambda step: step == 3 and os.kill(os.getpid(), signal.SIGTERM)
  with pytest.raises(preemption.Interrupted) as stopped:
    train.train_and_evaluate(config, workdir, model=model_for(config), after_step=sigterm_at_3)
  train.train_and_evaluate(config, workdir, model=model_for(config))
  return workdir, stopped.value


def test_sigterm_saves_and_resumes(pmap_run):
  workdir, stopped = pmap_run
  assert stopped.exit_code == 128 + signal.SIGTERM
  assert 'stopped by SIGTERM at step 3 (epoch 1, step 3 of 6)' in str(stopped)
  assert 'rerun the same command to resume' in str(stopped)
  assert [row['epoch'] for row in history(workdir)] == [1]
  assert (workdir / 'checkpoints' / '3').is_dir() and (workdir / 'checkpoints' / '6').is_dir()


def test_pmap_checkpoint_evaluates_on_one_device(pmap_run, idx_dir):
  workdir, _ = pmap_run
  config = make_config(idx_dir)
  state, step = final_state(workdir, target_for(config))
  runner = parallel.make_runner(config)
  data = input_pipeline.load_dataset('fashion_mnist', 'idx', str(idx_dir), 0, -1)
  result = train.evaluate(runner, train.compile_eval(runner, model_for(config), 28, SPEC),
                          runner.put_state(state.params), data.test_images, data.test_labels, 8)
  (row,) = history(workdir)
  assert step == 6 and result['count'] == 40
  np.testing.assert_allclose(result['accuracy'], row['test_acc'])
  np.testing.assert_allclose(result['loss'], row['test_loss'], rtol=1e-5)
  assert result['confusion'].sum() == 40 and np.trace(result['confusion']) == round(
      40 * row['test_acc'])


def test_evaluate_step_and_errors(reference, capsys, tmp_path):
  assert evaluate.main(['--workdir', str(reference), '--step', '99']) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: no checkpoint for step 99') and '6, 8, 12' in err
  assert evaluate.main(['--workdir', str(tmp_path)]) == 2
  assert 'error: no checkpoints in' in capsys.readouterr().err


def test_single_device_checkpoint_places_under_pmap(reference, target, idx_dir):
  state, step = final_state(reference, target)
  runner = parallel.make_runner(make_config(idx_dir, parallelism='pmap'))
  placed = runner.put_state(state)
  leaves = jax.tree.leaves(placed)
  assert leaves[0].shape[0] == jax.local_device_count() > 1  # replicated with a device axis
  chex.assert_trees_all_equal(runner.to_host(placed), state)


def test_save_state_writes_a_resumable_step0_checkpoint(target, idx_dir, tmp_path):
  config = make_config(idx_dir)
  folder = checkpoint.save_state(tmp_path / 'imported', target, config)
  assert folder == checkpoint.checkpoint_dir(tmp_path / 'imported') / '0'
  assert json.loads((tmp_path / 'imported' / 'config.json').read_text())['image_size'] == 28
  state, saved_config, step = checkpoint.restore_from_workdir(tmp_path / 'imported', target)
  assert step == 0 and saved_config.aux_weight == config.aux_weight
  chex.assert_trees_all_equal(state, checkpoint.host_tree(target))
  with pytest.raises(checkpoint.CheckpointError, match='already holds checkpoints'):
    checkpoint.save_state(tmp_path / 'imported', target, config)


def test_nan_loss_stops_with_a_clear_error_and_saves_nothing(target, idx_dir, tmp_path, capsys):
  # NaN weights imported through save_state (the interop path) make step 1's loss NaN.
  workdir = tmp_path / 'nan'
  poisoned = target.replace(params=jax.tree.map(lambda x: np.full_like(x, np.nan), target.params))
  checkpoint.save_state(workdir, poisoned, make_config(idx_dir))
  assert run_loop(workdir, idx_dir) == 2
  err = capsys.readouterr().err
  assert 'error: the training loss became NaN or inf at step 1 (epoch 1); stopped without ' \
         'saving; the last good checkpoint is step 0' in err, err
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == ['0']


def test_damaged_checkpoint_is_moved_aside_when_its_step_is_saved_again(reference_copy, idx_dir,
                                                                         capsys):
  """Resume from 8 past a damaged 12; saving 12 again moves the damaged one aside, deletes nothing."""
  DAMAGE['zeroed_files'](reference_copy / 'checkpoints' / '12')
  damaged_files = file_list(reference_copy / 'checkpoints' / '12')
  assert run_loop(reference_copy, idx_dir) == 0
  err = capsys.readouterr().err
  assert 'moved the unreadable checkpoint at step 12' in err, err
  moved = reference_copy / 'damaged_checkpoints' / '12'
  assert file_list(moved) == damaged_files
  target = target_for(make_config(idx_dir))
  assert final_state(reference_copy, target)[1] == 12


def test_resume_keeps_the_saved_normalisation(idx_dir, tmp_path, monkeypatch, capsys):
  """Statistics recomputed after a Pillow/libjpeg update differ in the last bits: not a refusal.

  The resumed run goes on with the checkpoint's own values; only classes and
  image shape must match exactly.
  """
  workdir = tmp_path / 'run'
  assert run_loop(workdir, idx_dir, normalize=True, num_epochs=1) == 0
  saved = checkpoint.read_dataset_spec(workdir)['normalization']
  recompute = train.input_pipeline.channel_stats
  monkeypatch.setattr(train.input_pipeline, 'channel_stats', lambda images: tuple(
      tuple(v * (1 + 1e-7) for v in values) for values in recompute(images)))
  assert run_loop(workdir, idx_dir, normalize=True, num_epochs=2) == 0, capsys.readouterr().err
  newest = checkpoint.read_dataset_spec(workdir)
  assert newest['normalization'] == saved and checkpoint.checkpoint_dir(workdir).joinpath(
      '12').is_dir()


def test_checkpoint_from_before_batch_stats_restores(target, idx_dir, tmp_path):
  """A checkpoint whose state has no ``batch_stats`` (written before the field) still restores."""
  import flax
  import orbax.checkpoint

  @flax.struct.dataclass
  class OldTrainState:  # TrainState as it was saved before batch_stats existed
    step: object
    params: object
    opt_state: object
    rng: object
    metrics: object

  assert target.batch_stats == {}
  old = OldTrainState(np.int32(5), jax.tree.map(lambda x: x + 1, target.params),
                      target.opt_state, target.rng, target.metrics)
  manager = checkpoint.open_manager(tmp_path)
  checkpoint.save(manager, 5, old, make_config(idx_dir))
  manager.wait_until_finished()
  manager.close()
  on_disk = orbax.checkpoint.StandardCheckpointHandler().metadata(
      checkpoint.checkpoint_dir(tmp_path) / '5' / 'state').tree
  assert 'batch_stats' not in on_disk and 'params' in on_disk
  state, step = final_state(tmp_path, target)
  assert step == 5 and state.batch_stats == {}
  chex.assert_trees_all_equal(state.params, old.params)

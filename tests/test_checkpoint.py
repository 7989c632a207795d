"""Checkpoints: exact resume after SIGKILL, SIGTERM stop, damage fallback, layouts, evaluate.

Training runs are real subprocesses (``train.py``) on the tiny synthetic IDX
set: 48 examples, batch 8 -> 6 steps per epoch, 2 epochs, a checkpoint every 4
steps and at each epoch's end (steps 4, 6, 8, 12; the newest 3 are kept).
Everything else works in-process on copies of those runs' workdirs.
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

from conftest import REPO
import jax

from gnet_jax import checkpoint, cli, evaluate, parallel, train

TIMING_KEYS = ('examples_per_sec', 'seconds')
OVERRIDES = dict(data_source='idx', batch_size=8, train_examples=48, num_epochs=2,
                 checkpoint_every_steps=4, parallelism='none', progress=False)


def run_train(workdir, idx_dir, env_extra=None, **overrides):
  args = [sys.executable, 'train.py', '--config', 'configs/quickstart.py', '--workdir',
          str(workdir), f'--config.data_dir={idx_dir}']
  args += [f'--config.{k}={v}' for k, v in {**OVERRIDES, **overrides}.items()]
  env = {**os.environ, **(env_extra or {})}
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def make_config(idx_dir, **overrides) -> ml_collections.ConfigDict:
  from configs import quickstart
  config = quickstart.get_config()
  config.data_dir = str(idx_dir)
  for key, value in {**OVERRIDES, **overrides}.items():
    config[key] = value
  return config


def final_state(workdir):
  state, _, step = checkpoint.restore_latest(workdir)
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
  result = run_train(workdir, idx_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture
def reference_copy(reference, tmp_path):
  shutil.copytree(reference, tmp_path / 'run')
  return tmp_path / 'run'


@pytest.fixture(scope='module')
def target(idx_dir):
  config = make_config(idx_dir)
  return train.create_train_state(config, (28, 28, 1), train.make_model(config),
                                  train.make_optimizer(config))


def test_reference_run_keeps_newest_checkpoints(reference):
  assert sorted(int(p.name) for p in (reference / 'checkpoints').iterdir()
                if p.name.isdigit()) == [6, 8, 12]
  assert [row['epoch'] for row in history(reference)] == [1, 2]
  assert json.loads((reference / 'config.json').read_text())['checkpoint_every_steps'] == 4


def test_resume_after_sigkill_is_exact(reference, idx_dir, tmp_path):
  workdir = tmp_path / 'killed'
  # Killed right after step 10 (epoch 2, step 4 of 6); the newest checkpoint is step 8.
  killed = run_train(workdir, idx_dir, {'GNET_JAX_TEST_SIGNAL': '10:KILL'})
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert [row['epoch'] for row in history(workdir)] == [1]
  resumed = run_train(workdir, idx_dir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resuming from the checkpoint at step 8 (epoch 2, step 2 of 6)' in resumed.stdout
  state, step = final_state(workdir)
  expected, expected_step = final_state(reference)
  assert step == expected_step == 12
  chex.assert_trees_all_equal(state, expected)  # params, optimizer, rng, metric sums: bitwise
  assert history(workdir) == history(reference)


def test_finished_run_rerun_does_nothing(reference_copy, idx_dir, capsys):
  before = {p: p.read_bytes() for p in (reference_copy / 'metrics.jsonl',
                                        reference_copy / 'config.json')}
  listing = file_list(reference_copy)
  summary = train.train_and_evaluate(make_config(idx_dir), reference_copy)
  assert 'nothing to do' in capsys.readouterr().out
  assert summary['epoch'] == 2
  assert {p: p.read_bytes() for p in before} == before
  assert file_list(reference_copy) == listing


@pytest.mark.parametrize('key,value', [('image_size', 32), ('aux_weight', 0.0),
                                       ('dataset', 'mnist')])
def test_config_mismatch_is_refused(reference_copy, idx_dir, capsys, key, value):
  config_json = (reference_copy / 'config.json').read_text()
  code = cli.run(make_config(idx_dir, **{key: value}), str(reference_copy))
  err = capsys.readouterr().err
  assert code == 2
  assert err.startswith('error: ') and key in err and 'different config' in err, err
  assert 'Traceback' not in err
  assert (reference_copy / 'config.json').read_text() == config_json


def test_allowed_config_changes():
  saved = checkpoint.config_dict(make_config('/a'))
  changed = make_config('/b', num_epochs=5, progress=True, checkpoint_every_steps=0,
                        max_checkpoints=1, eval_batch_size=16, parallelism='pmap')
  assert checkpoint.config_differences(saved, changed) == []
  assert checkpoint.config_differences(saved, make_config('/a', seed=1, momentum=0.5)) == [
      'momentum', 'seed']


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
  code = cli.run(make_config(idx_dir), str(reference_copy))
  err = capsys.readouterr().err
  assert code == 2
  assert 'error: no readable checkpoint' in err and 'nothing was deleted' in err, err
  assert file_list(reference_copy) == listing


# ----------------------------------------------------------------------------- SIGTERM, layouts


@pytest.fixture(scope='module')
def pmap_run(tmp_path_factory, idx_dir):
  """One epoch under pmap on 4 CPU devices, stopped by SIGTERM after step 3, then resumed."""
  workdir = tmp_path_factory.mktemp('pmap')
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  stopped = run_train(workdir, idx_dir, {**env, 'GNET_JAX_TEST_SIGNAL': '3:TERM'},
                      parallelism='pmap', num_epochs=1)
  resumed = run_train(workdir, idx_dir, env, parallelism='pmap', num_epochs=1)
  return workdir, stopped, resumed


def test_sigterm_saves_and_resumes(pmap_run):
  workdir, stopped, resumed = pmap_run
  assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
  assert 'SIGTERM received' in stopped.stderr
  assert 'stopped by SIGTERM at step 3 (epoch 1, step 3 of 6)' in stopped.stderr
  assert 'rerun the same command to resume' in stopped.stderr
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resuming from the checkpoint at step 3 (epoch 1, step 3 of 6)' in resumed.stdout
  assert 'pmap on 4 x' in resumed.stdout
  assert [row['epoch'] for row in history(workdir)] == [1]
  assert (workdir / 'checkpoints' / '3').is_dir() and (workdir / 'checkpoints' / '6').is_dir()


def test_pmap_checkpoint_evaluates_on_one_device(pmap_run, capsys):
  workdir, _, _ = pmap_run
  assert evaluate.main(['--workdir', str(workdir)]) == 0
  out = capsys.readouterr().out
  (row,) = history(workdir)
  assert 'checkpoint: step 6' in out
  assert f'test accuracy {row["test_acc"]:.4f}, test loss {row["test_loss"]:.4f} over 40 ' in out
  assert 'confusion matrix' in out and 'T-shirt/top' in out
  png = workdir / 'confusion.png'
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_evaluate_step_and_errors(reference, capsys, tmp_path):
  assert evaluate.main(['--workdir', str(reference), '--step', '99']) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: no checkpoint for step 99') and '6, 8, 12' in err
  assert evaluate.main(['--workdir', str(tmp_path)]) == 2
  assert 'error: no checkpoints in' in capsys.readouterr().err


def test_single_device_checkpoint_places_under_pmap(reference, idx_dir):
  state, _, step = checkpoint.restore_latest(reference)
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
  state, saved_config, step = checkpoint.restore_latest(tmp_path / 'imported')
  assert step == 0 and saved_config.aux_weight == config.aux_weight
  chex.assert_trees_all_equal(state, checkpoint.host_tree(target))
  with pytest.raises(checkpoint.CheckpointError, match='already holds checkpoints'):
    checkpoint.save_state(tmp_path / 'imported', target, config)


def test_nan_loss_stops_with_a_clear_error_and_saves_nothing(target, idx_dir, tmp_path):
  # NaN weights imported through save_state (the interop path) make step 1's loss NaN.
  workdir = tmp_path / 'nan'
  poisoned = target.replace(params=jax.tree.map(lambda x: np.full_like(x, np.nan), target.params))
  checkpoint.save_state(workdir, poisoned, make_config(idx_dir))
  result = run_train(workdir, idx_dir)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'error: the training loss became NaN or inf at step 1 (epoch 1); stopped without ' \
         'saving; the last good checkpoint is step 0' in result.stderr, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == ['0']

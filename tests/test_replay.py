"""``python -m benchmarks.replay``: a run's steps retraced from a checkpoint, in gnet-jax and
in PyTorch."""

import contextlib
import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from benchmarks import replay
from gnet_jax import metrics, ops

# Appended to ops.py: every convolution 1% larger, a kernel set that computes other values.
ALTERED = """

_stock_conv = conv


def conv(*args, **kwargs):
  return _stock_conv(*args, **kwargs) * 1.01
"""


@pytest.fixture(scope='module')
def jax_replay(book_run, tmp_path_factory) -> tuple[dict, str]:
  """Steps 3 and 4 replayed in gnet-jax, checked against checkpoint 4 and evaluated: the
  saved result and what was printed."""
  out = tmp_path_factory.mktemp('jax_replay') / 'replay.json'
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert replay.main(['--workdir', str(book_run), '--start', '2', '--stop', '4', '--check',
                        '4', '--eval', '--out', str(out)]) == 0
  return json.loads(out.read_text()), printed.getvalue()


def test_jax_replay_retraces_the_run_bit_for_bit(book_run, jax_replay):
  result, printed = jax_replay
  assert 'parameters after step 4 vs its checkpoint: bit-identical' in printed
  assert [r['step'] for r in result['rows']] == [3, 4]
  assert result['checks']['4']['identical'] and result['checks']['4']['distance'] == 0.0
  (epoch,) = metrics.read_jsonl(book_run / 'metrics.jsonl')
  assert result['test']['accuracy'] == epoch['test_acc']  # same weights, same evaluation
  assert all(r['update_norm'] > 0 and 0 <= r['acc'] <= 1 for r in result['rows'])


def git(folder: Path, *args: str) -> str:
  """git in ``folder``'s own repository, whatever GIT_* variables the test run inherited (an
  inherited GIT_DIR would send init, add and commit to another repository)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith('GIT_')}
  return subprocess.run(['git', '--git-dir', str(folder / '.git'), '--work-tree', str(folder),
                         '-c', 'user.name=t', '-c', 'user.email=t@t', *args], check=True,
                        capture_output=True, text=True, env=env).stdout.strip()


@pytest.fixture
def ops_history(tmp_path, monkeypatch):
  """A git repository holding today's ops.py (commit ``same``), then one whose convolutions
  compute other values (``altered``); ``--ops-at`` reads it through ``GIT_DIR``."""
  repo = tmp_path / 'history'
  (repo / 'gnet_jax').mkdir(parents=True)
  subprocess.run(['git', 'init', '-q', str(repo)], check=True, capture_output=True,
                 env={k: v for k, v in os.environ.items() if not k.startswith('GIT_')})
  source = Path(ops.__file__).read_text()
  revs = {}
  for name, text in (('same', source), ('altered', source + ALTERED)):
    (repo / 'gnet_jax' / 'ops.py').write_text(text)
    git(repo, 'add', 'gnet_jax/ops.py')
    git(repo, 'commit', '-q', '-m', name)
    revs[name] = git(repo, 'rev-parse', 'HEAD')
  monkeypatch.setenv('GIT_DIR', str(repo / '.git'))
  return revs


def test_replay_traces_with_the_kernels_of_a_commit(book_run, tmp_path, ops_history):
  """--ops-at REV traces GoogLeNet with ops.py as committed at REV: the run's own kernels
  retrace it bit for bit, kernels that compute other values do not."""
  results = {}
  for name, rev in ops_history.items():
    out = tmp_path / f'{name}.json'
    assert replay.main(['--workdir', str(book_run), '--start', '2', '--stop', '4', '--check',
                        '4', '--ops-at', rev, '--out', str(out)]) == 0
    results[name] = json.loads(out.read_text())
    assert results[name]['ops_at'] == rev
  assert results['same']['checks']['4'] == {'identical': True, 'distance': 0.0}
  assert results['altered']['checks']['4']['identical'] is False
  assert results['altered']['checks']['4']['distance'] > 0
  assert results['altered']['rows'][0]['loss'] != results['same']['rows'][0]['loss']


def test_torch_replay_follows_the_same_steps(book_run, jax_replay, tmp_path):
  pytest.importorskip('torch')
  torch_out = tmp_path / 'torch.json'
  assert replay.main(['--workdir', str(book_run), '--start', '2', '--stop', '4', '--torch',
                      '--out', str(torch_out)]) == 0
  jax_rows = jax_replay[0]['rows']
  torch_rows = json.loads(torch_out.read_text())['rows']
  for key, rtol in (('loss', 1e-4), ('acc', 0), ('update_norm', 1e-3)):
    np.testing.assert_allclose([r[key] for r in torch_rows], [r[key] for r in jax_rows],
                               rtol=rtol, err_msg=key)


def test_summary_names_the_spike_steps():
  rows = [{'step': s, 'loss': 0.3, 'acc': 0.9, 'update_norm': 0.1} for s in range(1, 11)]
  rows[6] = {'step': 7, 'loss': 2.5, 'acc': 0.1, 'update_norm': 3.0}
  lines = replay.summary_lines({'rows': rows, 'checks': {}}, spike_factor=3.0)
  assert lines[2] == '| 7 | 2.500 | 0.100 | 3.0000 |' and len(lines) == 4
  assert lines[-1].endswith('first step at 3x the median loss or more: 7')


def test_bad_steps_are_one_error(book_run, capsys):
  with pytest.raises(SystemExit) as info:
    replay.main(['--workdir', str(book_run), '--start', '4', '--stop', '2'])
  assert info.value.code == 2 and '--stop 2 must be after --start 4' in capsys.readouterr().err
  with pytest.raises(SystemExit) as info:
    replay.main(['--workdir', str(book_run), '--start', '3', '--stop', '4'])
  assert info.value.code == 2 and 'error:' in capsys.readouterr().err

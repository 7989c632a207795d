"""Two processes on 127.0.0.1 (2 CPU devices each) train like one process on 1 device.

Each test starts two processes joined by ``jax.distributed.initialize``:
the training loop end to end (TinyNet, ``sharded``; its ``metrics.jsonl``
against the one-device run of ``test_parallel``), a refused non-shared workdir, and the step of
``test_parallel`` (TinyNet with aux heads) under ``pmap`` and ``sharded``
(parameters, optimizer state and metrics against one device). Both processes
are killed whatever happens; each has a time limit.
"""

from __future__ import annotations

import pickle
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import pytest

from conftest import REPO, child_env
from gnet_jax import metrics as metrics_lib
from test_parallel import ATOL, RTOL, STEPS, assert_same_metrics, single_device_metrics, trajectory

TIMEOUT_S = 400  # per two-process run
CLI_TIMEOUT_S = 900
# gloo's connection report ("[Gloo] Rank 1 is connected to 3 peer ranks. Expected number of
# connected peer ranks is : 3"), which its threads may interleave mid-line: only its words,
# numbers and punctuation may appear in process 1's output.
GLOO_WORDS = (r'\[Gloo\]|Rank|is connected to|peer ranks|Expected number of connected|is :|'
              r'[\d.\s]')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


LOOP_WORKER = '''
import os, re, sys
from pathlib import Path
sys.path[:0] = [{repo!r}, {tests!r}]
import test_parallel as tp  # imports conftest, which asks for 8 CPU devices ...
os.environ['XLA_FLAGS'] = re.sub(r'count=\\d+', 'count=2', os.environ['XLA_FLAGS'])  # ... 2 here
from conftest import TinyNet
from gnet_jax import cli, parallel, train
config = tp.loop_config(Path({idx!r}), parallelism={mode!r}, distributed=True,
                        coordinator_address={address!r}, num_processes=2, process_id={pid})
parallel.maybe_initialize_distributed(config)
run = lambda: train.train_and_evaluate(config, Path({workdir!r}), model=TinyNet(aux_heads=True))
sys.exit(cli.run_command(lambda: run() and 0))
'''


def run_two_processes(workdirs: list[Path], idx_dir: Path, mode: str
                      ) -> list[tuple[int, str, str]]:
  """The real loop in two processes: (exit status, stdout, stderr) of each; killed on overrun."""
  address = f'127.0.0.1:{free_port()}'
  logs = [(workdirs[0].parent / f'process{i}.out', workdirs[0].parent / f'process{i}.err')
          for i in range(2)]
  procs = []
  try:
    for pid, (out, err) in enumerate(logs):
      code = LOOP_WORKER.format(repo=str(REPO), tests=str(REPO / 'tests'), idx=str(idx_dir),
                                mode=mode, address=address, pid=pid, workdir=str(workdirs[pid]))
      with open(out, 'w') as stdout, open(err, 'w') as stderr:
        procs.append(subprocess.Popen([sys.executable, '-c', code], cwd=REPO, env=child_env(2),
                                      stdout=stdout, stderr=stderr, text=True))
    deadline = time.monotonic() + CLI_TIMEOUT_S
    for proc in procs:
      try:
        proc.wait(timeout=max(deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        pytest.fail(f'timed out after {CLI_TIMEOUT_S} s; stderr of process {procs.index(proc)}:\n'
                    + logs[procs.index(proc)][1].read_text()[-3000:])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return [(proc.returncode, out.read_text(), err.read_text())
          for proc, (out, err) in zip(procs, logs)]


@pytest.mark.parametrize('mode', ['sharded'])
def test_two_processes_match_single_device(mode, tmp_path, idx_dir):
  # One workdir for both, as on a shared file system: only process 0 writes to it.
  workdir = tmp_path / 'run'
  results = run_two_processes([workdir, workdir], idx_dir, mode)
  for pid, (code, out, err) in enumerate(results):
    assert code == 0, f'process {pid} failed:\n{err[-3000:]}'
  out0, out1 = results[0][1], results[1][1]
  assert f'parallelism: {mode} on 4 x' in out0 and '2 process(es)' in out0
  assert 'per-device batch 2' in out0
  assert out0.count('epoch ') == 2 and 'epoch 2/2' in out0
  # Process 1 prints nothing (gloo's own connection lines aside, which two threads may interleave).
  assert re.sub(GLOO_WORDS, '', out1) == '', out1
  assert {'config.json', 'metrics.jsonl', 'curves.png'} <= {p.name for p in workdir.iterdir()}
  assert not list(workdir.glob('.gnet_jax_shared_*'))  # the shared-folder marker is removed
  got = metrics_lib.read_jsonl(workdir / 'metrics.jsonl')
  assert [m['epoch'] for m in got] == [1, 2]  # written once, not once per process
  assert_same_metrics(got, single_device_metrics(idx_dir))


def test_separate_workdirs_are_refused_at_start(tmp_path, idx_dir):
  """Two processes given different workdirs: a clear error on both, not a hang at shutdown."""
  workdirs = [tmp_path / 'p0', tmp_path / 'p1']
  results = run_two_processes(workdirs, idx_dir, 'sharded')
  for pid, (code, _, err) in enumerate(results):
    assert code == 2, f'process {pid}:\n{err[-3000:]}'
    assert 'error: --workdir' in err and 'is not shared: process(es) 1' in err, err[-3000:]
    assert 'Traceback' not in err
  assert not (tmp_path / 'p1').exists()
  assert not (tmp_path / 'p0' / 'checkpoints').exists()


# The steps of test_parallel (TinyNet with aux heads, 3 steps), run by two processes.
WORKER = '''
import os, pickle, re, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import test_parallel as tp  # imports conftest, which asks for 8 CPU devices ...
os.environ['XLA_FLAGS'] = re.sub(r'count=\\d+', 'count=2', os.environ['XLA_FLAGS'])  # ... 2 here
import jax
from gnet_jax import parallel
parallel.maybe_initialize_distributed(tp.make_config(
    distributed=True, coordinator_address={address!r}, num_processes=2, process_id={pid}))
assert jax.device_count() == 4 and jax.local_device_count() == 2
result = {{mode: tp.trajectory(True, mode, 4) for mode in ('pmap', 'sharded')}}
if jax.process_index() == 0:
  with open({out!r}, 'wb') as f:
    pickle.dump(result, f)
'''


def test_two_process_steps_match_single_device(tmp_path):
  """Parameters, optimizer state and metrics after each step, as on one device, under pmap
  and under sharded jit (one pair of processes runs both)."""
  address = f'127.0.0.1:{free_port()}'
  out = tmp_path / 'result.pkl'
  procs = []
  try:
    for pid in range(2):
      code = WORKER.format(repo=str(REPO), tests=str(REPO / 'tests'), address=address, pid=pid,
                           out=str(out))
      procs.append(subprocess.Popen([sys.executable, '-c', code], cwd=REPO, env=child_env(2),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [proc.communicate(timeout=TIMEOUT_S) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for pid, (proc, (_, err)) in enumerate(zip(procs, results)):
    assert proc.returncode == 0, f'process {pid} failed:\n{err[-3000:]}'
  by_mode = pickle.loads(out.read_bytes())
  ref = trajectory(True, 'none', 1)
  assert sorted(by_mode) == ['pmap', 'sharded']
  for got in by_mode.values():
    assert len(got) == len(ref) == STEPS
    for r, g in zip(ref, got):
      chex.assert_trees_all_close(g, r, rtol=RTOL, atol=ATOL)

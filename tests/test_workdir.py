"""One run owns a workdir: the lock itself, its release when the owner is killed, and train.py.

The end-to-end test runs GoogLeNet through ``train.py`` as a user would. To
be sure the second command meets a run that is still going, the first is
paused with SIGSTOP (it keeps its lock) once it has saved a checkpoint; it is
then killed with SIGKILL and resumed by its own command.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, child_env, pixels_of_color, read_png, run_python
from gnet_jax import state as state_lib, workdir as workdir_lib
from gnet_jax.errors import WorkdirError
from test_cli import run_train
from test_multihost import run_two_processes

HOLDER = '''
import sys, time
from pathlib import Path
sys.path[:0] = [{repo!r}]
from gnet_jax import workdir
fd = workdir.acquire(Path({workdir!r}))
print('held', flush=True)
time.sleep(600)
'''


def snapshot(folder: Path) -> dict[str, tuple]:
  """Every path under ``folder`` with its size and modification time, and the lock file's bytes."""
  found = {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
           for p in folder.rglob('*')}
  lock = folder / workdir_lib.LOCK_NAME
  return {**found, 'lock bytes': lock.read_bytes() if lock.exists() else None}


# ----------------------------------------------------------------------------- the lock


def test_a_held_workdir_is_refused_naming_its_owner(tmp_path):
  with workdir_lib.hold(tmp_path):
    before = snapshot(tmp_path)
    with pytest.raises(WorkdirError) as refused:
      with workdir_lib.hold(tmp_path):  # a second open file description: flock refuses it too
        pytest.fail('a second holder got the lock')
    assert snapshot(tmp_path) == before  # the refused one changed nothing
    owner = json.loads((tmp_path / workdir_lib.OWNER_NAME).read_text())
    assert owner['pid'] == os.getpid() and owner['command']
  message = str(refused.value)
  assert message.startswith(f'--workdir {tmp_path} is in use by pid {os.getpid()} on host '
                            f'{socket.gethostname()} since ')
  since = re.search(r' since (\S+) ', message).group(1)
  assert re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d', since), since
  assert 'choose another --workdir' in message and '\n' not in message
  assert not (tmp_path / workdir_lib.OWNER_NAME).exists()  # removed at release
  with workdir_lib.hold(tmp_path):  # released at the end of the block
    pass


def test_lock_dies_with_its_owner(tmp_path):
  """A holder killed with SIGKILL leaves its lock file behind, but not its lock."""
  workdir = tmp_path / 'new' / 'run'  # created by the holder
  holder = subprocess.Popen([sys.executable, '-c', HOLDER.format(repo=str(REPO),
                                                                 workdir=str(workdir))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == 'held\n', holder.stderr.read()
    with pytest.raises(WorkdirError, match=f'in use by pid {holder.pid} on host '):
      workdir_lib.acquire(workdir)
  finally:
    holder.kill()  # SIGKILL: no Python cleanup runs in the holder
    holder.wait()
  assert holder.returncode == -signal.SIGKILL
  left = json.loads((workdir / workdir_lib.OWNER_NAME).read_text())
  assert left['pid'] == holder.pid  # the dead owner's line stays ...
  assert workdir_lib.read_owner(workdir, attempts=1) is None  # ... but names nobody ...
  with workdir_lib.hold(workdir):  # ... and does not block
    assert workdir_lib.read_owner(workdir)['pid'] == os.getpid()


def test_a_dead_owners_line_is_not_named(tmp_path):
  """A holder that has not written its line yet, over a line a killed run left: 'another process'.

  The stale line sits both where older versions wrote it (run.lock) and in run.owner.
  """
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  pid = int(dead.stdout)
  stale = json.dumps({'pid': pid, 'host': socket.gethostname(), 'command': 'train.py --old',
                      'since': '2020-01-01T00:00:00+00:00'})
  for name in (workdir_lib.LOCK_NAME, 'run.owner'):
    (tmp_path / name).write_text(stale + '\n')
  with open(tmp_path / workdir_lib.LOCK_NAME) as f:
    fcntl.flock(f, fcntl.LOCK_EX)  # the new holder, between taking the lock and writing its line
    with pytest.raises(WorkdirError) as refused:
      workdir_lib.acquire(tmp_path)
  assert f'pid {pid}' not in str(refused.value) and '--old' not in str(refused.value)
  assert 'in use by another process' in str(refused.value)


HOLD_WORKER = '''
import sys
from pathlib import Path
sys.path[:0] = [{repo!r}]
from configs import default
from gnet_jax import cli, parallel, workdir
config = default.get_config()
config.update(dict(distributed=True, coordinator_address={address!r}, num_processes=2,
                   process_id={pid}))
parallel.maybe_initialize_distributed(config)
def hold():
  with workdir.hold(Path({workdir!r})):
    print('held', flush=True)
  return 0
sys.exit(cli.run_command(hold))
'''


def test_a_workdir_process_0_cannot_create_stops_every_process(tmp_path):
  """An OSError on process 0 (here: the workdir's parent is a file) is broadcast, not a hang."""
  from test_multihost import free_port
  (tmp_path / 'file').write_text('x')
  workdir = tmp_path / 'file' / 'run'
  address = f'127.0.0.1:{free_port()}'
  procs = [subprocess.Popen([sys.executable, '-c', HOLD_WORKER.format(
      repo=str(REPO), address=address, pid=pid, workdir=str(workdir))], cwd=REPO,
      env=child_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for pid in range(2)]
  try:
    results = [proc.communicate(timeout=120) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  errors = [err for _, err in results]
  assert [proc.returncode for proc in procs] == [2, 2], errors
  assert f'error: --workdir {workdir}: cannot create it or its run.lock (' in errors[0]
  assert f'error: --workdir {workdir}: process 0 could not take the run' in errors[1]
  assert not any('Traceback' in err for err in errors), errors


def test_a_lock_without_an_owner_line_is_still_refused(tmp_path):
  (tmp_path / workdir_lib.LOCK_NAME).touch()
  with open(tmp_path / workdir_lib.LOCK_NAME) as f:
    fcntl.flock(f, fcntl.LOCK_EX)  # a holder that has not written its line (yet)
    with pytest.raises(WorkdirError, match=r'in use by another process \(it has not named '
                                           r'itself in run.owner\)'):
      workdir_lib.acquire(tmp_path)
  assert (tmp_path / workdir_lib.LOCK_NAME).read_text() == ''
  assert not (tmp_path / workdir_lib.OWNER_NAME).exists()  # the refused one wrote nothing


def test_two_processes_of_another_run_are_both_refused(tmp_path, idx_dir):
  """A busy workdir refuses a multi-host run on every process, not just process 0."""
  workdir = tmp_path / 'run'
  with workdir_lib.hold(workdir):
    before = snapshot(workdir)
    results = run_two_processes([workdir, workdir], idx_dir, 'sharded')
    assert snapshot(workdir) == before
  for pid, (code, _, err) in enumerate(results):
    assert code == 2, f'process {pid}:\n{err[-3000:]}'
    assert f'error: --workdir {workdir} is in use by pid {os.getpid()} on host' in err, err
    assert 'Traceback' not in err


# ----------------------------------------------------------------------------- train.py

def train_args(workdir: Path, idx_dir: Path) -> list[str]:
  """GoogLeNet on the tiny data: 2 epochs of 6 steps, a checkpoint and a point every 2 steps."""
  return ['--config', 'configs/quickstart.py', '--workdir', str(workdir),
          '--config.data_source=idx', f'--config.data_dir={idx_dir}',
          '--config.train_examples=48', '--config.eval_examples=16', '--config.batch_size=8',
          '--config.num_epochs=2', '--config.checkpoint_every_steps=2',
          '--config.log_every_steps=2', '--config.progress=False']


def start_train(args: list[str], log: Path) -> subprocess.Popen:
  """``train.py`` in the background, its output into ``log``.out and ``log``.err."""
  with open(f'{log}.out', 'w') as out, open(f'{log}.err', 'w') as err:
    return subprocess.Popen([sys.executable, 'train.py', *args], cwd=REPO, stdout=out,
                            stderr=err, env=child_env())


def wait_for_checkpoint(proc: subprocess.Popen, workdir: Path, log: Path,
                        timeout: float = 300) -> int:
  """The first finished checkpoint's step, polled while ``proc`` trains."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    folder = workdir / 'checkpoints'
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    if steps:
      return max(steps)
    if proc.poll() is not None:
      pytest.fail(f'train.py ended ({proc.returncode}) before a checkpoint:\n'
                  + Path(f'{log}.err').read_text()[-3000:])
    time.sleep(0.01)
  pytest.fail(f'no checkpoint after {timeout} s:\n' + Path(f'{log}.err').read_text()[-3000:])


def thread_state(task: Path) -> str:
  """One letter of /proc/PID/task/TID/stat ('' for a thread that has just ended)."""
  try:
    return (task / 'stat').read_text().rsplit(')', 1)[1].split()[0]
  except (FileNotFoundError, ProcessLookupError):
    return ''


def pause(proc: subprocess.Popen, timeout: float = 60) -> None:
  """SIGSTOP ``proc`` and wait until every thread has stopped.

  A signal is delivered, not obeyed, when ``kill`` returns: a thread inside a system call (the
  checkpointer's writes and renames) finishes it first, and could change the workdir after the
  test's snapshot. Linux shows each thread's state in /proc: 'T' once it is stopped.
  """
  proc.send_signal(signal.SIGSTOP)
  tasks, deadline = Path(f'/proc/{proc.pid}/task'), time.monotonic() + timeout
  while time.monotonic() < deadline:
    if all(thread_state(t) in ('T', 't', '') for t in tasks.iterdir()):
      return
    time.sleep(0.01)
  pytest.fail(f'train.py (pid {proc.pid}) did not stop within {timeout} s of SIGSTOP')


def finished_run_is_intact(workdir: Path, idx_dir: Path) -> None:
  """The workdir a user's run leaves: its config, both epochs' metrics, every step's point
  once (the killed run's later points cut at the resume), the plot, TensorBoard's events."""
  config = json.loads((workdir / 'config.json').read_text())
  assert config['image_size'] == 28 and config['data_dir'] == str(idx_dir)
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['epoch'], r['step']) for r in rows] == [(1, 6), (2, 12)]
  for key in ('train_loss', 'train_acc', 'test_acc', 'examples_per_sec', 'seconds'):
    assert all(key in r for r in rows), key
  points = [json.loads(line)['step'] for line in (workdir / 'steps.jsonl').read_text().splitlines()]
  assert points == [2, 4, 6, 8, 10, 12]
  curves = read_png(workdir / 'curves.png')
  assert curves.shape == (350, 500, 3) and pixels_of_color(curves, 'C0') > 150  # a loss curve
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  step = state_lib.load_checkpoint(workdir).step
  assert step == 12


def test_a_second_run_is_refused_and_the_killed_first_resumes_with_the_same_command(
    tmp_path, idx_dir):
  """While the first run holds the workdir, a second is refused and evaluate still reads it;
  once the first is killed with SIGKILL (no cleanup runs), its own command resumes it."""
  workdir, log = tmp_path / 'run', tmp_path / 'first'
  args = train_args(workdir, idx_dir)
  first = start_train(args, log)
  try:
    saved = wait_for_checkpoint(first, workdir, log)
    pause(first)  # mid-training, holding the lock, writing nothing
    before = snapshot(workdir)
    second = run_train(*args)
    assert snapshot(workdir) == before  # nothing written, the lock file untouched
    assert second.returncode == 2, second.stderr[-3000:]
    (line,) = second.stderr.strip().splitlines()
    assert re.fullmatch(
        rf'error: --workdir {re.escape(str(workdir))} is in use by pid {first.pid} on host '
        rf'{re.escape(socket.gethostname())} since \S+ \(train.py --config '
        r'configs/quickstart.py .*\); wait for that run to end or stop it, or choose another '
        r'--workdir', line), line
    assert second.stdout == ''
    # evaluate takes no lock: it reads the newest checkpoint while the run trains.
    evaluated = run_python('-m', 'gnet_jax.evaluate', '--workdir', str(workdir), timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    step = int(re.search(r'checkpoint: step (\d+) in', evaluated.stdout).group(1))
    assert saved <= step < 12 and 'test accuracy' in evaluated.stdout, evaluated.stdout
    first.send_signal(signal.SIGKILL)
  finally:
    if first.poll() is None:
      first.kill()
    first.wait()
  assert first.returncode == -signal.SIGKILL
  assert 'epoch 2/2' not in Path(f'{log}.out').read_text()  # killed mid-training
  left = json.loads((workdir / workdir_lib.OWNER_NAME).read_text())
  assert left['pid'] == first.pid  # its line is still there
  resumed = run_train(*args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  step = int(re.search(r'resuming from the checkpoint at step (\d+)', resumed.stdout).group(1))
  assert saved <= step < 12 and step % 2 == 0
  assert f'idx files in {idx_dir}' in resumed.stdout
  assert re.search(r'^epoch 2/2: loss \d+\.\d{3}, train acc \d\.\d{3}, test acc \d\.\d{3}, '
                   r'\d+\.\d examples/sec on cpu:0$', resumed.stdout, re.M), resumed.stdout
  assert not (workdir / workdir_lib.OWNER_NAME).exists()  # the resumed run removed it at its end
  finished_run_is_intact(workdir, idx_dir)

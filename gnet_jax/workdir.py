"""One run owns a workdir: a lock that the training run holds until it ends.

Two runs on one workdir would resume from and save into the same
``checkpoints/`` and corrupt each other, and re-running a command in a second
terminal is an ordinary mistake. So a training run holds an exclusive
``fcntl.flock`` on ``<workdir>/run.lock`` for as long as it runs. The kernel
drops the lock when its process dies, however it dies (kill -9 included), so a
dead run never blocks its own resume and no stale-lock cleanup is needed. Only
the process that got the lock writes its pid, host, start time and command
line, whole, into ``<workdir>/run.owner`` (removed at release), so a refused
run can say who owns the workdir; a line a killed run left is not named while
its pid is gone. A refused run writes nothing. ``evaluate`` and ``predict``
take no lock: they may read a workdir while it trains; ``interop import``,
which writes a checkpoint, takes it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from gnet_jax.errors import WorkdirError

LOCK_NAME = 'run.lock'
# The holder's pid, host, start time and command: written whole (a temporary file renamed over
# it) once the lock is taken, removed at release. A killed holder leaves its file behind, so a
# reader names an owner only if it is alive (checked for this host's processes).
OWNER_NAME = 'run.owner'


class _Busy(WorkdirError):
  """The workdir's lock is held by another run."""


def owner_info() -> dict:
  """What a refused run prints about this one."""
  return {'pid': os.getpid(), 'host': socket.gethostname(),
          'since': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
          'command': ' '.join(shlex.join(sys.argv).split())}  # one line


def _alive(owner: dict) -> bool:
  """False only for a pid of this host that no longer runs (another host's cannot be checked)."""
  if owner.get('host') != socket.gethostname() or not isinstance(owner.get('pid'), int):
    return True
  try:
    os.kill(owner['pid'], 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process: alive
    return True
  return True


def read_owner(workdir: Path, attempts: int = 20) -> dict | None:
  """The live holder's owner line in ``workdir``'s ``run.owner``, or None if there is none to read.

  The holder writes it right after it gets the lock, over whatever a killed
  holder left; a reader that comes in between sees no file, or a dead pid's
  line, and retries for a moment before naming nobody.
  """
  for attempt in range(attempts):
    try:
      owner = json.loads((workdir / OWNER_NAME).read_text())
      if isinstance(owner, dict) and _alive(owner):
        return owner
    except (OSError, ValueError):
      pass
    if attempt + 1 < attempts:
      time.sleep(0.05)
  return None


def in_use_message(workdir: Path) -> str:
  owner = read_owner(workdir)
  if owner is None:
    who = f'another process (it has not named itself in {OWNER_NAME})'
  else:
    who = f'pid {owner.get("pid")} on host {owner.get("host")} since {owner.get("since")}'
    if owner.get('command'):
      who += f' ({owner["command"][:200]})'
  return (f'--workdir {workdir} is in use by {who}; wait for that run to end or stop it, '
          'or choose another --workdir')


def _write_owner(workdir: Path) -> None:
  """This process's owner line, replacing the file whole: a reader sees the old or the new."""
  tmp = workdir / f'.{OWNER_NAME}.{os.getpid()}.tmp'
  tmp.write_text(json.dumps(owner_info()) + '\n')
  os.replace(tmp, workdir / OWNER_NAME)


def acquire(workdir: Path) -> int | None:
  """Locks ``workdir`` for this process: the lock file's descriptor; ``WorkdirError`` if taken.

  Release with ``release``. On a file system that cannot lock (some network
  mounts) this warns and returns None: training goes on unguarded. Other
  ``OSError``s (the folder cannot be created) are the caller's to report.
  """
  workdir.mkdir(parents=True, exist_ok=True)  # a busy workdir exists already: nothing new
  try:
    fd = os.open(workdir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
  except PermissionError:
    raise WorkdirError(f'--workdir {workdir}: {LOCK_NAME} is not writable by this user; '
                       'choose another --workdir or fix its permissions') from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise _Busy(in_use_message(workdir)) from None
    print(f'warning: cannot lock {workdir / LOCK_NAME} ({e.strerror}): nothing stops a second '
          'run on this workdir', file=sys.stderr)
    return None
  try:
    os.ftruncate(fd, 0)  # an owner line of an older gnet-jax, which wrote it here
    _write_owner(workdir)
  except BaseException:
    os.close(fd)
    raise
  return fd


def release(workdir: Path, fd: int | None) -> None:
  """Drops the lock ``acquire`` took, its owner line first (while still holding it)."""
  if fd is None:
    return
  try:
    (workdir / OWNER_NAME).unlink(missing_ok=True)
  finally:
    os.close(fd)


# What process 0 tells the others about the lock (a multi-host run).
_HELD, _BUSY, _FAILED = 0, 1, 2


@contextlib.contextmanager
def hold(workdir: Path) -> Iterator[None]:
  """Owns ``workdir`` for the ``with`` block; ``WorkdirError`` naming the owner if it is busy.

  Processes of one multi-host run share one workdir: process 0 owns it for
  all of them and the others take no lock (they must not refuse their own
  run). Process 0's outcome is broadcast, so when a second run is refused, or
  process 0 cannot create the workdir at all, every process stops here rather
  than waiting for process 0 at the next barrier.
  """
  import jax

  workdir = Path(workdir)
  fd, error, outcome = None, None, _HELD
  multi = jax.process_count() > 1
  if jax.process_index() == 0:
    try:
      fd = acquire(workdir)
    except _Busy as e:
      error, outcome = e, _BUSY
    except WorkdirError as e:
      error, outcome = e, _FAILED
    except OSError as e:
      error, outcome = WorkdirError(
          f'--workdir {workdir}: cannot create it or its {LOCK_NAME} ({e.strerror or e}); '
          'choose another --workdir or fix its permissions'), _FAILED
    except BaseException:
      if multi:
        _broadcast(_FAILED)  # a bug: the others stop too, then its traceback
      raise
  if multi:
    outcome = _broadcast(outcome)
    if error is None and outcome == _BUSY:
      error = WorkdirError(in_use_message(workdir))
    elif error is None and outcome == _FAILED:
      error = WorkdirError(f'--workdir {workdir}: process 0 could not take the run\'s lock '
                           '(its own error says why)')
  if error is not None:
    raise error
  try:
    yield
  finally:
    release(workdir, fd)


def _broadcast(outcome: int) -> int:
  """Process 0's ``outcome`` on every process."""
  import numpy as np
  from jax.experimental import multihost_utils

  return int(multihost_utils.broadcast_one_to_all(np.int32(outcome)))

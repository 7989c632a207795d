"""One run owns a workdir: a lock that the training run holds until it ends.

Two runs on one workdir would resume from and save into the same
``checkpoints/`` and corrupt each other, and re-running a command in a second
terminal is an ordinary mistake. So a training run holds an exclusive
``fcntl.flock`` on ``<workdir>/run.lock`` for as long as it runs. The kernel
drops the lock when its process dies, however it dies (kill -9 included), so a
dead run never blocks its own resume and no stale-lock cleanup is needed. Only
the process that got the lock writes its pid, host, start time and command
line into the file, so a refused run can say who owns the workdir; a refused
run writes nothing. ``evaluate`` and ``predict`` take no lock: they may read a
workdir while it trains.
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


def owner_info() -> dict:
  """What a refused run prints about this one."""
  return {'pid': os.getpid(), 'host': socket.gethostname(),
          'since': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
          'command': ' '.join(shlex.join(sys.argv).split())}  # one line


def read_owner(workdir: Path, attempts: int = 20) -> dict | None:
  """The owner written into ``workdir``'s lock file, or None if there is none to read.

  The owner writes its line right after it gets the lock; a reader that comes
  in between sees an empty file and retries for a moment.
  """
  for attempt in range(attempts):
    try:
      return json.loads((workdir / LOCK_NAME).read_text())
    except (OSError, ValueError):
      if attempt + 1 < attempts:
        time.sleep(0.05)
  return None


def in_use_message(workdir: Path) -> str:
  owner = read_owner(workdir)
  if owner is None:
    who = f'another process (its {LOCK_NAME} names none)'
  else:
    who = f'pid {owner.get("pid")} on host {owner.get("host")} since {owner.get("since")}'
    if owner.get('command'):
      who += f' ({owner["command"][:200]})'
  return (f'--workdir {workdir} is in use by {who}; wait for that run to end or stop it, '
          'or choose another --workdir')


def acquire(workdir: Path) -> int | None:
  """Locks ``workdir`` for this process: the lock file's descriptor; ``WorkdirError`` if taken.

  Close the descriptor to release the lock. On a file system that cannot lock
  (some network mounts) this warns and returns None: training goes on unguarded.
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
      raise WorkdirError(in_use_message(workdir)) from None
    print(f'warning: cannot lock {workdir / LOCK_NAME} ({e.strerror}): nothing stops a second '
          'run on this workdir', file=sys.stderr)
    return None
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(owner_info()) + '\n').encode(), 0)
  return fd


@contextlib.contextmanager
def hold(workdir: Path) -> Iterator[None]:
  """Owns ``workdir`` for the ``with`` block; ``WorkdirError`` naming the owner if it is busy.

  Processes of one multi-host run share one workdir: process 0 owns it for
  all of them and the others take no lock (they must not refuse their own
  run). Process 0's answer is broadcast, so when a second run is refused,
  every one of its processes stops here rather than waiting for process 0 at
  the next barrier.
  """
  import jax

  fd, error = None, None
  if jax.process_index() == 0:
    try:
      fd = acquire(workdir)
    except WorkdirError as e:
      error = e
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils

    refused = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if refused and error is None:
      error = WorkdirError(in_use_message(workdir))
  if error is not None:
    raise error
  try:
    yield
  finally:
    if fd is not None:
      os.close(fd)  # releases the lock; the owner line stays for whoever looks

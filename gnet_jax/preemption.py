"""Stopping cleanly on SIGTERM/SIGINT (preemption, Ctrl-C): the stop request and its error."""

from __future__ import annotations

import os
import signal
import sys
import threading


class Interrupted(Exception):
  """Stopped by SIGTERM/SIGINT after saving a checkpoint; exit with ``exit_code`` (128 + signal)."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


class StopRequest:
  """Turns the first SIGTERM/SIGINT into a request to stop at the next step boundary.

  A second SIGINT aborts at once. With several processes the handlers are not
  installed: a signal on one host must not make hosts save different steps, so
  there orbax's preemption sync point (``reached_preemption``) decides instead.
  """

  def __init__(self, manager, multi_host: bool):
    self.signum = None
    self._manager = manager
    self._multi_host = multi_host
    self._previous = {}

  def __enter__(self) -> 'StopRequest':
    if not self._multi_host and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame) -> None:
    if self.signum is not None:
      if signum == signal.SIGINT:
        print('second interrupt: aborting at once, without a checkpoint', file=sys.stderr,
              flush=True)
        os._exit(128 + signum)
      return
    self.signum = signum
    print(f'{signal.Signals(signum).name} received: saving a checkpoint at the next step '
          'boundary, then stopping (Ctrl-C again aborts at once)', file=sys.stderr, flush=True)

  def requested(self, step: int) -> bool:
    if self._multi_host and self.signum is None and self._manager.reached_preemption(step):
      self.signum = signal.SIGTERM
    return self.signum is not None

  def interrupted(self, step: int, steps_per_epoch: int) -> Interrupted:
    """Waits until the checkpoint of ``step`` is written; the error to raise then."""
    self._manager.wait_until_finished()
    name = signal.Signals(self.signum).name
    epoch, position = divmod(step, steps_per_epoch)
    return Interrupted(
        f'stopped by {name} at step {step} (epoch {epoch + 1}, step {position} of '
        f'{steps_per_epoch}); checkpoint saved in {self._manager.directory / str(step)}; '
        'rerun the same command to resume', 128 + self.signum)

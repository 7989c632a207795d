"""The project's exception types for bad input.

Each is raised where the problem is found, with a message that names it and
the fix; every command turns an ``InputError`` into one ``error: ...`` line and
exit status 2 (``gnet_jax.cli.run_command``). Any other exception is a bug and
keeps its traceback.
"""


class InputError(Exception):
  """Bad input from the user: the message says what is wrong and how to fix it."""


class ConfigError(InputError):
  """A config value out of range, of the wrong type, or not fitting the devices."""


class DatasetError(InputError):
  """A dataset that cannot be found or read; the message names the file and the fix."""


class CheckpointError(InputError):
  """No usable checkpoint, or one that does not fit the config."""


class WorkdirError(InputError):
  """A workdir that cannot be used: a file, not writable, too little space, not shared."""


class StateDictError(InputError, ValueError):
  """A PyTorch state dict (or parameter tree) that is not the d2l GoogLeNet."""


class NonFiniteLossError(InputError):
  """The loss became NaN or inf; the last good checkpoint is kept."""


class DependencyError(InputError):
  """An optional package this command needs is not installed; the message says what to install."""

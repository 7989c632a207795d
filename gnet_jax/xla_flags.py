"""Per-platform runtime defaults that must be in place before JAX starts its backends.

Import this module and call :func:`apply_defaults` before the first JAX
computation (``train.py`` and the benchmarks do it before importing ``jax``).
It uses only the standard library, so importing it does not start JAX.

Defaults, measured in ``docs/performance.md``:

- ``--xla_cpu_experimental_ynn_fusion_type=`` (empty: no fusion goes to
  YNNPACK). On a 2-core AVX-512 CPU with jax 0.10.2, XLA:CPU's own
  convolutions beat the YNNPACK path by 1.3-1.6x on training at 96x96. The
  flag only touches the CPU backend, so GPU/TPU runs are unaffected. It is an
  experimental flag, and XLA aborts the process on an unknown flag, so it is
  only added when the installed jaxlib binary contains the flag's name.

Opting out: set ``GNET_JAX_XLA_DEFAULTS=0`` (XLA's own defaults, YNNPACK
included), or put your own value of the flag in ``XLA_FLAGS``: a flag already
named there is never overridden.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import mmap
import os
from pathlib import Path

YNN_FLAG_NAME = 'xla_cpu_experimental_ynn_fusion_type'
# Empty value: no fusion kind is handed to YNNPACK; XLA:CPU emits its own code.
CPU_DEFAULT_FLAGS = (f'--{YNN_FLAG_NAME}=',)
OPT_OUT_ENV = 'GNET_JAX_XLA_DEFAULTS'


@functools.cache
def _jaxlib_binaries() -> tuple[Path, ...]:
  spec = importlib.util.find_spec('jaxlib')  # locates jaxlib without importing it
  if spec is None or not spec.submodule_search_locations:
    return ()
  folder = Path(next(iter(spec.submodule_search_locations)))
  return tuple(sorted(folder.glob('libjax_common*.so*')) or sorted(folder.glob('*xla_extension*')))


@functools.cache
def xla_knows_flag(name: str) -> bool:
  """Whether the installed jaxlib's XLA defines the flag ``name`` (without starting JAX).

  Scans the shared library for the flag's name (memory-mapped, ~0.2 s once):
  a flag XLA does not know would abort the process at backend start-up.
  """
  needle = name.encode()
  for path in _jaxlib_binaries():
    try:
      with open(path, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m.find(needle) >= 0:
          return True
    except (OSError, ValueError):
      continue
  return False


def default_xla_flags() -> list[str]:
  """The flags :func:`apply_defaults` would add for this jaxlib (may be empty)."""
  return [f for f in CPU_DEFAULT_FLAGS if xla_knows_flag(f[2:].split('=')[0])]


def apply_defaults(environ: os._Environ | dict | None = None) -> list[str]:
  """Adds gnet-jax's default XLA flags to ``XLA_FLAGS``; returns the flags added.

  Leaves a flag alone when ``XLA_FLAGS`` already mentions it, and adds nothing
  when ``GNET_JAX_XLA_DEFAULTS=0``. Must run before JAX initialises a backend.
  """
  env = os.environ if environ is None else environ
  if env.get(OPT_OUT_ENV, '1').strip().lower() in ('0', 'false', 'no', 'off'):
    return []
  current = env.get('XLA_FLAGS', '')
  added = [f for f in default_xla_flags() if f[2:].split('=')[0] not in current]
  if added:
    env['XLA_FLAGS'] = ' '.join([current, *added]).strip()
  return added


CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'


def compilation_cache_dir(setting: str, environ: os._Environ | dict | None = None) -> Path | None:
  """Where compiled programs are cached for ``compilation_cache`` = 'auto' | 'off' | a folder.

  JAX's own ``JAX_COMPILATION_CACHE_DIR``, when set, wins (tests use it);
  'auto' is a per-user folder, ``$XDG_CACHE_HOME/gnet_jax/xla`` (default
  ``~/.cache/gnet_jax/xla``).
  """
  env = os.environ if environ is None else environ
  if env.get(CACHE_ENV):
    return Path(env[CACHE_ENV])
  if setting in ('off', ''):
    return None
  if setting == 'auto':
    base = Path(env.get('XDG_CACHE_HOME') or Path.home() / '.cache')
    return base / 'gnet_jax' / 'xla'
  return Path(setting).expanduser()


def enable_compilation_cache(setting: str) -> Path | None:
  """Turns on JAX's persistent compilation cache, so a second run skips most compiling.

  The first run of a config compiles the GoogLeNet step for 12-16 s on a small
  CPU; a second run loads it from the cache (docs/performance.md). Must run
  before the first compilation. Returns the folder, or None when off.
  """
  import jax  # the module itself stays importable before JAX starts

  folder = compilation_cache_dir(setting)
  if folder is None or os.environ.get(CACHE_ENV):
    return folder  # off, or configured through JAX's own variables: leave JAX's settings
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError:
    return None  # a read-only home: run without the cache rather than fail
  jax.config.update('jax_compilation_cache_dir', str(folder))
  # Cache every program that took a while to compile, the small eval step included.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  return folder


def return_freed_memory() -> bool:
  """Hands the C heap's free pages back to the OS; call it once compiling is done.

  XLA:CPU's compiler frees about 0.6 GB after compiling GoogLeNet's train step,
  but glibc keeps those pages mapped, and the step's own buffers then come on
  top: a 96x96 training process peaked at 1.7 GiB RSS, 1.2 GiB with this call
  after compiling (docs/performance.md). Nothing in JAX or XLA does this, so
  it is glibc's ``malloc_trim(0)`` through ctypes. Returns whether it ran
  (False off glibc, e.g. macOS or musl).
  """
  name = ctypes.util.find_library('c')
  try:
    trim = ctypes.CDLL(name).malloc_trim if name else None
  except (OSError, AttributeError):
    trim = None
  if trim is None:
    return False
  trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
  trim(0)
  return True


def seconds_since_process_start() -> float | None:
  """Wall time since this process started (Linux /proc), to report start-up cost; else None."""
  try:
    ticks = int(Path('/proc/self/stat').read_text().rsplit(')', 1)[1].split()[19])
    uptime = float(Path('/proc/uptime').read_text().split()[0])
    return uptime - ticks / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError):
    return None

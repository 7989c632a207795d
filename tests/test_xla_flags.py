"""gnet_jax.xla_flags: per-platform XLA defaults, the compilation cache, the freed heap."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from gnet_jax import xla_flags


def test_apply_defaults_respects_the_user_and_the_opt_out():
  env = {}
  added = xla_flags.apply_defaults(env)
  assert added == xla_flags.default_xla_flags()
  assert all(f in env.get('XLA_FLAGS', '') for f in added)
  mine = {'XLA_FLAGS': f'--{xla_flags.YNN_FLAG_NAME}=dot'}
  assert xla_flags.apply_defaults(mine) == [] and mine['XLA_FLAGS'].endswith('=dot')
  off = {xla_flags.OPT_OUT_ENV: '0'}
  assert xla_flags.apply_defaults(off) == [] and 'XLA_FLAGS' not in off


def test_flag_detection_reads_the_installed_jaxlib():
  assert not xla_flags.xla_knows_flag('xla_no_such_flag_for_sure_12345')
  assert xla_flags.xla_knows_flag('xla_force_host_platform_device_count')


def test_compilation_cache_folder(tmp_path):
  home = {'XDG_CACHE_HOME': str(tmp_path)}
  assert xla_flags.compilation_cache_dir('auto', home) == tmp_path / 'gnet_jax' / 'xla'
  assert xla_flags.compilation_cache_dir('off', home) is None
  assert xla_flags.compilation_cache_dir('/x/y', home) == Path('/x/y')
  # JAX's own variable wins over the config (the tests set it).
  assert xla_flags.compilation_cache_dir('off', {**home, 'JAX_COMPILATION_CACHE_DIR': '/c'}) == \
      Path('/c')


def test_seconds_since_process_start_counts_this_process():
  import time
  first = xla_flags.seconds_since_process_start()
  time.sleep(0.05)
  second = xla_flags.seconds_since_process_start()
  assert 0 < first < second < 24 * 3600


FREED_HEAP = '''
import ctypes, ctypes.util, sys
from gnet_jax import xla_flags
libc = ctypes.CDLL(ctypes.util.find_library('c'))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss_mib():
  line = next(l for l in open('/proc/self/status') if l.startswith('VmRSS'))
  return int(line.split()[1]) / 1024
# 200 MiB of 4 KiB blocks (heap, not mmap), touched, then freed; the block kept above them
# stops glibc from shrinking the heap by itself, so the pages stay until trimmed.
blocks = [libc.malloc(4096) for _ in range(51200)]
pin = libc.malloc(4096)
for b in blocks:
  ctypes.memset(b, 1, 4096)
for b in blocks:
  libc.free(b)
before = rss_mib()
print(xla_flags.return_freed_memory(), before - rss_mib())
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc/self/status')
def test_return_freed_memory_gives_the_heap_back():
  # A child process: this one's heap holds whatever the other tests left in it.
  out = subprocess.run([sys.executable, '-c', FREED_HEAP], capture_output=True, text=True,
                       check=True, cwd=REPO).stdout.split()
  assert out[0] == 'True'
  assert float(out[1]) > 150, f'only {out[1]} MiB returned to the OS'

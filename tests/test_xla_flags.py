"""gnet_jax.xla_flags: per-platform XLA defaults and the persistent compilation cache."""

from pathlib import Path

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

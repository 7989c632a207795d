"""What one checkpoint costs: ``python benchmarks/checkpoint_cost.py [--config configs/quickstart.py]``.

Builds the config's train state on one device, gives its optimizer moments
nonzero values (as after training; zeros would compress away on disk), then
saves it 5 times through ``gnet_jax.checkpoint`` exactly as the training loop
does and restores it 3 times. Prints the time the loop blocks per save
(device-to-host copy and handing the arrays to orbax), the time until the
background write is finished, the size on disk and the restore time.
"""

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gnet_jax import checkpoint, parallel, state as state_lib  # noqa: E402


def load_config(path: str):
  spec = importlib.util.spec_from_file_location('config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', default='configs/quickstart.py')
  args = parser.parse_args()
  config = load_config(args.config)
  config.parallelism = 'none'
  runner = parallel.make_runner(config)
  size = config.image_size
  host = state_lib.build(config)[2]
  # Optimizer moments start at zero, which compresses away on disk; a trained run's do not.
  rng = np.random.default_rng(0)
  host = host.replace(opt_state=jax.tree.map(
      lambda x: rng.standard_normal(x.shape).astype(x.dtype)
      if x.ndim and np.issubdtype(x.dtype, np.floating) else x, host.opt_state))
  state = runner.put_state(host)
  leaves = jax.tree.leaves(checkpoint.host_tree(host))
  print(f'{args.config} ({size}x{size}): {len(leaves)} arrays, '
        f'{sum(x.nbytes for x in leaves) / 1e6:.1f} MB in memory')
  workdir = Path(tempfile.mkdtemp(prefix='checkpoint_cost_'))
  try:
    manager = checkpoint.open_manager(workdir, max_to_keep=3)
    for step in range(1, 6):
      t0 = time.perf_counter()
      checkpoint.save(manager, step, runner.to_host(state).replace(step=np.int32(step)), config)
      t1 = time.perf_counter()
      manager.wait_until_finished()
      t2 = time.perf_counter()
      print(f'save {step}: loop blocked {t1 - t0:.3f} s, written after {t2 - t0:.3f} s')
    manager.close()
    on_disk = sum(p.stat().st_size for p in (workdir / 'checkpoints' / '5').rglob('*')
                  if p.is_file())
    print(f'on disk: {on_disk / 1e6:.1f} MB per checkpoint')
    reader = checkpoint.open_manager(workdir, read_only=True)
    for _ in range(3):
      t0 = time.perf_counter()
      checkpoint.restore(reader, host, config, step=5)
      print(f'restore: {time.perf_counter() - t0:.3f} s')
    reader.close()
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
  main()

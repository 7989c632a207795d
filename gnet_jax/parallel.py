"""How the step functions are placed on devices: one device, ``jax.pmap``, or sharded ``jax.jit``.

The train and eval step functions are the same in every mode; a ``Runner``
only decides where state and batches live and how the steps are compiled.

- ``none``: plain ``jax.jit`` on the first device.
- ``pmap``: ``jax.pmap`` with axis name ``batch`` over the runner's devices;
  state replicated with a leading device axis, batch split
  ``[local_devices, per_device, ...]``. With several processes each process
  maps over its own devices and the collectives span all of them.
- ``sharded``: ``jax.jit`` over a ``Mesh`` of the runner's (global) devices,
  batch sharded on the ``data`` axis, state replicated; XLA inserts the
  collectives, so the step is written as for one device.

Device order is process-major (process 0's devices first), so device ``k``
holds rows ``[k * b, (k + 1) * b)`` of the global batch in both modes, which is
what ``input_pipeline.train_batches`` hands each process.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gnet_jax.errors import ConfigError, WorkdirError

PMAP_AXIS = 'batch'
DATA_AXIS = 'data'


@dataclasses.dataclass(frozen=True)
class Runner:
  mode: str
  devices: tuple  # every device taking part, all processes, process-major
  mesh: Mesh | None = None  # 'sharded': over ``devices``; 'pmap': over this process's devices

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def local_devices(self) -> tuple:
    return _process_local(self.devices)

  @property
  def device_label(self) -> str:
    d = self.devices[0]
    return f'{d.platform}:{d.id}' if self.num_devices == 1 else f'{self.num_devices} x {d.platform}'

  def describe(self, batch_size: int) -> str:
    d = self.devices[0]
    return (f'parallelism: {self.mode} on {self.num_devices} x {d.device_kind} ({d.platform}), '
            f'{jax.process_count()} process(es), global batch {batch_size}, '
            f'per-device batch {batch_size // self.num_devices}')

  # --- placement ---------------------------------------------------------------

  def put_state(self, tree: Any) -> Any:
    """Host (or device) pytree -> replicated on the runner's devices."""
    if self.mode == 'none':
      return jax.device_put(tree, self.devices[0])
    if self.mode == 'pmap':
      n = len(self.local_devices)
      sharding = NamedSharding(self.mesh, P(PMAP_AXIS))
      return jax.tree.map(
          lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), sharding),
          tree)
    sharding = NamedSharding(self.mesh, P())
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                               lambda idx, x=np.asarray(x): x[idx]), tree)

  def put_batch(self, batch: dict[str, np.ndarray]) -> Any:
    """This process's rows of a global batch -> on device, split across devices.

    Each process passes only its own slice; nothing is gathered across hosts.
    """
    if self.mode == 'none':
      return jax.device_put(batch, self.devices[0])
    if self.mode == 'pmap':
      n = len(self.local_devices)
      sharding = NamedSharding(self.mesh, P(PMAP_AXIS))
      return jax.tree.map(
          lambda x: jax.device_put(x.reshape((n, -1) + x.shape[1:]), sharding), batch)
    sharding = NamedSharding(self.mesh, P(DATA_AXIS))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

  def to_host(self, tree: Any) -> Any:
    """A replicated device pytree -> NumPy (one replica), without a cross-host gather."""
    def one(x):
      value = np.asarray(x.addressable_shards[0].data)
      return value[0] if self.mode == 'pmap' else value
    return jax.tree.map(one, tree)

  # --- compilation -------------------------------------------------------------

  def _compile(self, fn: Callable, donate: bool, **static) -> Callable:
    donate_argnums = (0,) if donate else ()
    if self.mode == 'pmap':
      return jax.pmap(functools.partial(fn, axis_name=PMAP_AXIS, **static), axis_name=PMAP_AXIS,
                      devices=self.devices, donate_argnums=donate_argnums)
    if self.mode == 'sharded':
      replicated, data = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P(DATA_AXIS))
      return jax.jit(functools.partial(fn, **static), in_shardings=(replicated, data),
                     out_shardings=replicated, donate_argnums=donate_argnums)
    return jax.jit(functools.partial(fn, **static), donate_argnums=donate_argnums)

  def train_step(self, fn: Callable, **static) -> Callable:
    """``fn(state, batch, **static) -> state`` compiled for this mode, state donated."""
    return self._compile(fn, True, **static)

  def eval_step_fn(self, fn: Callable, **static) -> Callable:
    """``fn(variables, batch, **static) -> sums`` compiled for this mode."""
    return self._compile(fn, False, **static)


def resolve_mode(mode: str, num_devices: int) -> str:
  """``config.parallelism`` (checked by ``config.validate``) with ``auto`` decided."""
  if mode == 'auto':
    return 'sharded' if num_devices > 1 else 'none'
  return mode


def _process_local(devices) -> tuple:
  """This process's devices among ``devices``, in their order."""
  return tuple(d for d in devices if d.process_index == jax.process_index())


def select_devices(requested: int, devices: list | None = None) -> list:
  """``requested`` devices (0 = all), the same number from every process, process-major."""
  # Stable: keeps JAX's order (topology-aware on TPUs) within each process.
  devices = sorted(devices or jax.devices(), key=lambda d: d.process_index)
  if not requested or requested == len(devices):
    return devices
  processes = jax.process_count()
  if requested < 0 or requested > len(devices) or requested % processes:
    raise ConfigError(f'num_devices {requested} is not possible with {len(devices)} devices in '
                     f'{processes} process(es); use 0 (all) or a multiple of {processes} '
                     f'up to {len(devices)}')
  per_process = requested // processes
  return [d for p in range(processes)
          for d in [d for d in devices if d.process_index == p][:per_process]]


def make_runner(config: ml_collections.ConfigDict, devices: list | None = None) -> Runner:
  """The runner the config asks for; checks that the batch divides across devices."""
  devices = select_devices(config.num_devices, devices)
  mode = resolve_mode(config.parallelism, len(devices))
  if mode == 'none':
    if jax.process_count() > 1:
      raise ConfigError(f'parallelism none runs on one device but there are '
                       f'{jax.process_count()} processes; use pmap or sharded')
    devices = devices[:1]
  for count, what in ((len(devices), 'devices'), (jax.process_count(), 'processes')):
    if config.batch_size % count:
      raise ConfigError(f'batch_size {config.batch_size} does not divide across {count} {what}; '
                       f'use a multiple of {count} (--config.batch_size=...)')
  mesh = None
  if mode == 'sharded':
    mesh = Mesh(np.array(devices), (DATA_AXIS,))
  elif mode == 'pmap':
    mesh = Mesh(np.array(_process_local(devices)), (PMAP_AXIS,))
  return Runner(mode=mode, devices=tuple(devices), mesh=mesh)


def check_shared_workdir(workdir: Path) -> None:
  """With several processes, refuses a workdir that is not one folder seen by all of them.

  Checkpoints are written by all processes together and read back by each, so
  separate folders (or a path on a disk only one host mounts) would hang at
  shutdown. Process 0 writes a marker file; every process looks for it.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  token = int(multihost_utils.broadcast_one_to_all(np.int32(np.random.randint(1, 2**31 - 1))))
  marker = workdir / f'.gnet_jax_shared_{token}'
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    marker.touch()
  multihost_utils.sync_global_devices('gnet_jax workdir marker written')
  seen = multihost_utils.process_allgather(np.int32(marker.exists()))
  multihost_utils.sync_global_devices('gnet_jax workdir marker read')
  if jax.process_index() == 0:
    marker.unlink()
  missing = [i for i, ok in enumerate(np.asarray(seen).reshape(-1)) if not ok]
  if missing:
    raise WorkdirError(f'--workdir {workdir} is not shared: process(es) '
                       f'{", ".join(map(str, missing))} do not see what process 0 writes there; '
                       'give every process the same --workdir on a shared file system')


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """``jax.distributed.initialize`` when the config asks for several processes.

  With ``distributed=True`` and no address, JAX finds the cluster itself (TPU
  pods, SLURM, Open MPI, Kubernetes); ``coordinator_address``, ``num_processes``
  and ``process_id`` set it up by hand (e.g. two processes on 127.0.0.1).
  Must run before anything touches a device.
  """
  if not config.distributed:
    return
  kwargs = {}
  if config.coordinator_address:
    kwargs = dict(coordinator_address=config.coordinator_address,
                  num_processes=config.num_processes, process_id=config.process_id)
  jax.distributed.initialize(**kwargs)

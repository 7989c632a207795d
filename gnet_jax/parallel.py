"""How the step functions are placed on devices: one device, ``jax.pmap``, or sharded ``jax.jit``.

The train and eval step functions are the same in every mode; a ``Runner``
only decides where state and batches live and how the steps are compiled.

- ``none``: plain ``jax.jit`` on the first device.
- ``pmap``: ``jax.pmap`` over this process's devices with axis name ``batch``;
  state replicated with a leading device axis, batch split ``[devices, per_device, ...]``.
- ``sharded``: ``jax.jit`` over a ``Mesh`` of all (global) devices, batch sharded
  on the ``data`` axis, state replicated; XLA inserts the collectives.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MODES = ('auto', 'none', 'pmap', 'sharded')
PMAP_AXIS = 'batch'
DATA_AXIS = 'data'


@dataclasses.dataclass(frozen=True)
class Runner:
  mode: str
  devices: tuple  # every device taking part (all processes)
  mesh: Mesh | None = None
  eval_step: Callable | None = None

  @property
  def num_devices(self) -> int:
    return len(self.devices)

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
      local = jax.local_devices()
      sharding = NamedSharding(Mesh(np.array(local), (PMAP_AXIS,)), P(PMAP_AXIS))
      return jax.tree.map(
          lambda x: jax.device_put(np.stack([np.asarray(x)] * len(local)), sharding), tree)
    sharding = NamedSharding(self.mesh, P())
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                               lambda idx, x=np.asarray(x): x[idx]), tree)

  def put_batch(self, batch: dict[str, np.ndarray]) -> Any:
    """This process's share of a global batch -> on device, split across devices."""
    if self.mode == 'none':
      return jax.device_put(batch, self.devices[0])
    if self.mode == 'pmap':
      local = jax.local_devices()
      sharding = NamedSharding(Mesh(np.array(local), (PMAP_AXIS,)), P(PMAP_AXIS))
      return jax.tree.map(
          lambda x: jax.device_put(x.reshape((len(local), -1) + x.shape[1:]), sharding), batch)
    sharding = NamedSharding(self.mesh, P(DATA_AXIS))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

  def to_host(self, tree: Any) -> Any:
    """A replicated device pytree -> NumPy (one replica), without a cross-host gather."""
    def one(x):
      value = np.asarray(x.addressable_shards[0].data)
      return value[0] if self.mode == 'pmap' else value
    return jax.tree.map(one, tree)

  # --- compilation -------------------------------------------------------------

  def train_step(self, fn: Callable, **static) -> Callable:
    """``fn(state, batch, **static) -> state`` compiled for this mode, state donated."""
    if self.mode == 'pmap':
      return jax.pmap(functools.partial(fn, axis_name=PMAP_AXIS, **static),
                      axis_name=PMAP_AXIS, donate_argnums=0)
    if self.mode == 'sharded':
      replicated, data = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P(DATA_AXIS))
      return jax.jit(functools.partial(fn, **static), in_shardings=(replicated, data),
                     out_shardings=replicated, donate_argnums=0)
    return jax.jit(functools.partial(fn, **static), donate_argnums=0)

  def eval_step_fn(self, fn: Callable, **static) -> Callable:
    """``fn(params, batch, **static) -> sums`` compiled for this mode."""
    if self.mode == 'pmap':
      return jax.pmap(functools.partial(fn, axis_name=PMAP_AXIS, **static), axis_name=PMAP_AXIS)
    if self.mode == 'sharded':
      replicated, data = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P(DATA_AXIS))
      return jax.jit(functools.partial(fn, **static), in_shardings=(replicated, data),
                     out_shardings=replicated)
    return jax.jit(functools.partial(fn, **static))

  def with_eval(self, eval_step: Callable) -> 'Runner':
    return dataclasses.replace(self, eval_step=eval_step)


def resolve_mode(mode: str, num_devices: int) -> str:
  if mode not in MODES:
    raise ValueError(f'unknown parallelism {mode!r}; choose one of {", ".join(MODES)}')
  if mode == 'auto':
    return 'sharded' if num_devices > 1 else 'none'
  return mode


def make_runner(config: ml_collections.ConfigDict, devices: list | None = None) -> Runner:
  """The runner the config asks for; checks that the batch divides across devices."""
  devices = list(devices or jax.devices())
  mode = resolve_mode(config.get('parallelism', 'auto'), len(devices))
  if mode == 'none':
    devices = devices[:1]
  for count, what in ((len(devices), 'devices'), (jax.process_count(), 'processes')):
    if config.batch_size % count:
      raise ValueError(f'batch_size {config.batch_size} does not divide across {count} {what}; '
                       f'use a multiple of {count} (--config.batch_size=...)')
  mesh = Mesh(np.array(devices), (DATA_AXIS,)) if mode == 'sharded' else None
  return Runner(mode=mode, devices=tuple(devices), mesh=mesh)


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """``jax.distributed.initialize`` when the config asks for several processes.

  With ``distributed=True`` and no address, JAX finds the cluster itself (TPU
  pods, SLURM, ...); ``coordinator_address``/``num_processes``/``process_id``
  set it up by hand (e.g. two processes on 127.0.0.1).
  """
  if not config.get('distributed', False):
    return
  kwargs = {}
  if config.get('coordinator_address', ''):
    kwargs = dict(coordinator_address=config.coordinator_address,
                  num_processes=config.num_processes, process_id=config.process_id)
  jax.distributed.initialize(**kwargs)

"""Data parallelism: the same step under jit, pmap and sharded jit gives the same result.

Most tests drive ``TinyNet``, a small model with GoogLeNet's interface (the
``train``/``example_keys`` arguments and the real ``models.AuxHead`` with its
per-example dropout), because compiling the full GoogLeNet step takes tens of
seconds per configuration on a small CPU and the parallel code does not care
which model it runs. The real GoogLeNet runs under a data-parallel layout in
the notebook test (sharded over two CPU devices, through ``train.py``).
Set ``GNET_TEST_FULL_MODEL=1`` to run the step tests on GoogLeNet too.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
import chex
import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from conftest import TinyNet, make_images
from gnet_jax import input_pipeline, metrics as metrics_lib, models, parallel, state as state_lib, train
from gnet_jax.errors import ConfigError

SPEC = input_pipeline.dataset_spec('fashion_mnist')

FULL_MODEL = bool(os.environ.get('GNET_TEST_FULL_MODEL'))
BATCH = 8  # divides by 1, 2, 4 and 8 devices
STEPS = 3
RTOL, ATOL = 1e-5, 1e-6
MULTI = [('pmap', 2), ('pmap', 4), ('pmap', 8), ('sharded', 2), ('sharded', 4), ('sharded', 8)]


def make_config(**overrides):
  config = default.get_config()
  config.image_size = 28
  config.batch_size = BATCH
  config.learning_rate = 0.1
  config.momentum = 0.9  # so the optimizer state matters too
  for key, value in overrides.items():
    config[key] = value
  return config


def make_model(config):
  if FULL_MODEL:
    return state_lib.create_model(config, SPEC)
  return TinyNet(aux_heads=config.aux_weight > 0, dtype=state_lib.DTYPES[config.dtype])


def global_batches(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
  images, labels = make_images(n * BATCH, seed)
  images, labels = images[..., None], labels.astype(np.int32)
  return [{'image': images[i * BATCH:(i + 1) * BATCH], 'label': labels[i * BATCH:(i + 1) * BATCH]}
          for i in range(n)]


@functools.lru_cache(maxsize=None)
def initial_state(aux: bool, dtype: str = 'float32') -> state_lib.TrainState:
  config = make_config(aux_weight=0.3 if aux else 0.0, dtype=dtype)
  model = make_model(config)
  return state_lib.create_train_state(config, SPEC, model, state_lib.create_optimizer(config))


@functools.lru_cache(maxsize=None)
def trajectory(aux: bool, mode: str, num_devices: int) -> list[dict]:
  """Host copies of params, opt_state and metric sums after each of ``STEPS`` steps.

  Cached: each configuration compiles and runs once per test session.
  """
  config = make_config(aux_weight=0.3 if aux else 0.0, parallelism=mode,
                       num_devices=num_devices)
  runner = parallel.make_runner(config)
  assert (runner.mode, runner.num_devices) == (mode, num_devices)
  model, tx = make_model(config), state_lib.create_optimizer(config)
  step = runner.train_step(train.train_step, model=model, tx=tx, image_size=28,
                           aux_weight=config.aux_weight)
  state = runner.put_state(initial_state(aux))
  rows = slice(jax.process_index() * BATCH // jax.process_count(),
               (jax.process_index() + 1) * BATCH // jax.process_count())
  out = []
  for batch in global_batches(STEPS):  # each process passes only its own rows
    state = step(state, runner.put_batch({k: v[rows] for k, v in batch.items()}))
    out.append(runner.to_host({'params': state.params, 'opt_state': state.opt_state,
                               'metrics': state.metrics, 'step': state.step}))
  return out


def max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------- steps


@pytest.mark.parametrize('mode,num_devices', MULTI)
def test_step_matches_single_device(mode, num_devices):
  ref = trajectory(False, 'none', 1)
  got = trajectory(False, mode, num_devices)
  for step, (r, g) in enumerate(zip(ref, got), start=1):
    assert int(g['step']) == step
    assert int(g['metrics']['count']) == step * BATCH
    chex.assert_trees_all_close(g, r, rtol=RTOL, atol=ATOL)


# With aux heads every configuration is checked too; the dropout masks come from
# keys folded with each example's global index, so they must not depend on the split.
@pytest.mark.parametrize('mode,num_devices', MULTI)
def test_step_with_aux_heads_matches_single_device(mode, num_devices):
  ref = trajectory(True, 'none', 1)
  got = trajectory(True, mode, num_devices)
  for r, g in zip(ref, got):
    chex.assert_trees_all_close(g, r, rtol=RTOL, atol=ATOL)
  assert 'aux1' in got[-1]['params']
  # The aux head trained (its dropout mask took part) rather than staying at init.
  assert max_abs_diff(got[-1]['params']['aux1'], initial_state(True).params['aux1']) > 0


def test_aux_dropout_masks_are_per_example():
  """Swapping two examples swaps their masks: a key follows the example, not its slot."""
  head = models.AuxHead(10)
  x = jnp.ones((4, 4, 4, 8))
  params = head.init(jax.random.key(0), x, None)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(1), i))(jnp.arange(4))
  out = head.apply(params, x, keys)
  swapped = head.apply(params, x, keys[jnp.array([1, 0, 2, 3])])
  np.testing.assert_allclose(swapped[0], out[1], rtol=1e-6)
  assert not np.allclose(out[0], out[1])


# ----------------------------------------------------------------------------- runner


def test_auto_mode_and_device_selection():
  assert parallel.make_runner(make_config()).mode == 'sharded'
  assert parallel.make_runner(make_config()).num_devices == jax.device_count()
  one = parallel.make_runner(make_config(num_devices=1))
  assert (one.mode, one.num_devices) == ('none', 1)
  assert parallel.make_runner(make_config(parallelism='none')).num_devices == 1


def test_describe_names_mode_device_and_per_device_batch():
  runner = parallel.make_runner(make_config(parallelism='pmap', num_devices=4))
  text = runner.describe(BATCH)
  assert 'pmap' in text and '4 x' in text and jax.devices()[0].device_kind in text
  assert 'per-device batch 2' in text and 'global batch 8' in text


@pytest.mark.parametrize('mode', ['pmap', 'sharded', 'auto'])
def test_batch_not_divisible_is_a_clear_error(mode):
  with pytest.raises(ConfigError, match=r'batch_size 6 .* 4 devices'):
    parallel.make_runner(make_config(parallelism=mode, num_devices=4, batch_size=6))


def test_bad_num_devices():
  # An unknown parallelism is config.validate's (tests/test_config.py).
  with pytest.raises(ConfigError, match='num_devices 9'):
    parallel.make_runner(make_config(num_devices=9))


# ----------------------------------------------------------------------------- eval


@functools.lru_cache(maxsize=None)
def eval_result(mode: str, num_devices: int, eval_batch: int, n_test: int = 13) -> dict:
  config = make_config(parallelism=mode, num_devices=num_devices)
  runner = parallel.make_runner(config)
  model = make_model(config)
  eval_fn = train.compile_eval(runner, model, 28, SPEC)
  images, labels = make_images(n_test, 5)
  params = runner.put_state(initial_state(False).params)
  return train.evaluate(runner, eval_fn, params, images[..., None], labels.astype(np.int32),
                        train.eval_batch_size(make_config(eval_batch_size=eval_batch),
                                              runner.num_devices))


@pytest.mark.parametrize('mode,num_devices,eval_batch',
                         [('pmap', 8, 8), ('sharded', 8, 8), ('pmap', 4, 6), ('sharded', 4, 6)])
def test_eval_counts_every_example_once(mode, num_devices, eval_batch):
  """13 test examples over 4 or 8 devices: the padding is masked out, nothing is lost."""
  ref = eval_result('none', 1, 16)  # one batch holding all 13
  got = eval_result(mode, num_devices, eval_batch)
  assert ref['count'] == got['count'] == 13
  np.testing.assert_allclose(got['loss'], ref['loss'], rtol=RTOL)
  assert got['accuracy'] == ref['accuracy']
  # And against a direct computation over the 13 examples.
  images, labels = make_images(13, 5)
  logits = make_model(make_config()).apply({'params': initial_state(False).params},
                                           images[..., None].astype(np.float32) / 255.0)
  loss = float(np.mean(train.cross_entropy(logits, labels.astype(np.int32))))
  np.testing.assert_allclose(got['loss'], loss, rtol=1e-5)


# ----------------------------------------------------------------------------- bfloat16


def test_bfloat16_trains_with_float32_params():
  config = make_config(dtype='bfloat16', parallelism='sharded', num_devices=2,
                       learning_rate=0.05)
  runner = parallel.make_runner(config)
  model, tx = make_model(config), state_lib.create_optimizer(config)
  assert model.dtype == jnp.bfloat16
  step = runner.train_step(train.train_step, model=model, tx=tx, image_size=28)
  state = runner.put_state(initial_state(False, 'bfloat16'))
  batch = runner.put_batch(global_batches(1)[0])
  losses = []
  for _ in range(4):  # the same batch again and again: its loss must fall
    before = runner.to_host(state.metrics['loss_sum'])
    state = step(state, batch)
    losses.append(float(runner.to_host(state.metrics['loss_sum']) - before) / BATCH)
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    assert leaf.dtype == jnp.float32
  assert state.metrics['loss_sum'].dtype == jnp.float32
  logits = model.apply({'params': state.params}, jnp.zeros((2, 28, 28, 1)))
  assert logits.dtype == jnp.float32
  # The convolution itself ran in bfloat16 (not just the input cast).
  hlo = jax.jit(lambda p, x: model.apply({'params': p}, x)).lower(
      state.params, jnp.zeros((2, 28, 28, 1))).as_text()
  convs = [line for line in hlo.splitlines() if 'convolution' in line]
  assert convs and all(line.endswith('bf16>') for line in convs), convs


@pytest.mark.parametrize('kernels', ['xla', 'custom'])
def test_bfloat16_runs_the_inception_kernels_in_bfloat16(kernels):
  """Every conv, matmul and max of an Inception block computes in bfloat16, with both kernel sets."""
  block = models.Inception(8, (4, 8), (2, 4), 4, dtype=jnp.bfloat16, kernels=kernels)
  x = jnp.ones((2, 6, 6, 8), jnp.bfloat16)  # as GoogLeNet casts its input
  params = block.init(jax.random.key(0), x)['params']
  loss = lambda p: jnp.sum(block.apply({'params': p}, x).astype(jnp.float32))
  hlo = jax.jit(jax.grad(loss)).lower(params).as_text()
  ops_lines = [line for line in hlo.splitlines()
               if any(op in line for op in ('stablehlo.convolution', 'stablehlo.dot_general',
                                            'stablehlo.maximum'))]
  assert len(ops_lines) >= 6
  for line in ops_lines:
    result_type = line.rsplit('->', 1)[-1]
    assert 'bf16' in result_type, line
  assert block.apply({'params': params}, x).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- the loop


def loop_config(idx_dir: Path, **overrides) -> ml_collections.ConfigDict:
  """2 epochs of 3 steps on the synthetic data (13 test examples), TinyNet with an aux head.

  lr 0.01: at lr 0.1 with momentum 0.9 this tiny problem diverges, and a
  divergent run amplifies float rounding; the point here is the device layout.
  """
  config = make_config(data_source='idx', data_dir=str(idx_dir), train_examples=24,
                       eval_examples=13, num_epochs=2, learning_rate=0.01, aux_weight=0.3,
                       progress=False, **overrides)
  return config


METRIC_KEYS = ('epoch', 'step', 'train_loss', 'train_acc', 'test_loss', 'test_acc')


def assert_same_metrics(got: list[dict], ref: list[dict]) -> None:
  assert len(got) == len(ref) > 0
  for g, r in zip(got, ref):
    for key in METRIC_KEYS:
      np.testing.assert_allclose(g[key], r[key], rtol=RTOL, atol=ATOL, err_msg=key)


def run_loop(workdir: Path, idx_dir: Path, **overrides) -> list[dict]:
  config = loop_config(idx_dir, **overrides)
  train.train_and_evaluate(config, workdir, model=TinyNet(aux_heads=True))
  return metrics_lib.read_jsonl(workdir / 'metrics.jsonl')


@functools.lru_cache(maxsize=None)
def single_device_metrics(idx_dir: Path) -> list[dict]:
  """metrics.jsonl of a one-device run of the loop; once per session (test_multihost uses it)."""
  workdir = Path(tempfile.mkdtemp(prefix='gnet_single_'))
  try:
    return run_loop(workdir, idx_dir, parallelism='none')
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize('mode', ['pmap', 'sharded'])
def test_loop_on_4_devices_matches_single_device(tmp_path, idx_dir, capsys, mode):
  got = run_loop(tmp_path, idx_dir, parallelism=mode, num_devices=4)
  assert f'parallelism: {mode} on 4 x' in capsys.readouterr().out
  assert_same_metrics(got, single_device_metrics(idx_dir))
  assert json.loads((tmp_path / 'config.json').read_text())['num_devices'] == 4


def test_loop_batch_not_divisible_names_both_numbers(tmp_path, idx_dir):
  with pytest.raises(ConfigError, match=r'batch_size 6 does not divide across 4 devices'):
    run_loop(tmp_path / 'w', idx_dir, parallelism='sharded', batch_size=6, num_devices=4)
  assert not (tmp_path / 'w').exists()

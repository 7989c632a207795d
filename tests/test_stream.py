"""Streaming input (``--config.input=stream``, gnet_jax/stream.py): Grain reads while training.

The real loop runs in-process on TinyNet over a generated three-class folder
(48 training images, batch 8 -> 6 steps per epoch, 2 epochs, a checkpoint
every 4 steps); only the kill -9 tests start child processes (one, and two
pairs joined by ``jax.distributed``). The Grain
datasets themselves are checked on plain integers: every example once per
epoch, the memory path's layout across processes, evaluation padded and masked.
"""

import functools
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import psutil
import pytest

from conftest import REPO, TinyNet, child_env
from gnet_jax import checkpoint, cli, input_pipeline, parallel, state as state_lib, stream, train
from gnet_jax.errors import CheckpointError, ConfigError, DatasetError
from image_folders import folder_config, make_folder

TIMING_KEYS = ('examples_per_sec', 'seconds')


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return make_folder(tmp_path_factory.mktemp('stream') / 'shapes', {'train': 16, 'test': 6})


def stream_config(folder, **overrides):
  """``image_folders.folder_config`` streamed, a checkpoint every 4 steps."""
  return folder_config(folder, **{'checkpoint_every_steps': 4, 'input': 'stream',
                                  'data_workers': 0, **overrides})


def run(config, workdir, after_step=None):
  return cli.run_command(lambda: train.train_and_evaluate(
      config, workdir, model=TinyNet(num_classes=3), after_step=after_step) and 0)


def history(workdir):
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def final_state(workdir, config):
  spec = input_pipeline.DatasetSpec.from_json(checkpoint.read_dataset_spec(workdir))
  target = state_lib.create_train_state(config, spec, TinyNet(num_classes=3),
                                        state_lib.create_optimizer(config))
  state, _, step = checkpoint.restore_from_workdir(workdir, target)
  return state, step


@pytest.fixture(scope='module')
def reference(tmp_path_factory, folder):
  """An uninterrupted streamed run (do not modify: copy it)."""
  workdir = tmp_path_factory.mktemp('reference')
  assert run(stream_config(folder), workdir) == 0
  return workdir


# ----------------------------------------------------------------------------- datasets


def _element(record):
  return {'image': np.full((1, 1, 1), record, np.uint8), 'label': np.int32(record)}


def integers(n_train, n_test=0):
  return stream.StreamData(list(range(n_train)), list(range(1, n_test + 1)), _element,
                           input_pipeline.DatasetSpec('ints', (1, 1, 1), ('a', 'b')), 'ints')


def labels_of(dataset):
  return [np.asarray(dataset[i]['label']) for i in range(len(dataset))]


def test_each_epoch_is_the_whole_training_set_once_in_a_new_order():
  data = integers(50)
  batches = labels_of(stream.train_dataset(data, 8, seed=3, num_epochs=3))
  assert len(batches) == 3 * 6 and all(b.shape == (8,) for b in batches)
  epochs = [np.concatenate(batches[e * 6:(e + 1) * 6]) for e in range(3)]
  for seen in epochs:  # 48 of 50: the last partial batch is dropped, nothing repeats
    assert len(set(seen.tolist())) == 48 and set(seen.tolist()) <= set(range(50))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  again = labels_of(stream.train_dataset(data, 8, seed=3, num_epochs=3))
  np.testing.assert_array_equal(np.concatenate(again), np.concatenate(batches))
  other = labels_of(stream.train_dataset(data, 8, seed=4, num_epochs=1))
  assert not np.array_equal(np.concatenate(other), epochs[0])


def test_processes_hold_the_memory_paths_rows_of_each_global_batch():
  data = integers(50)
  whole = labels_of(stream.train_dataset(data, 8, seed=0, num_epochs=2))
  parts = [labels_of(stream.train_dataset(data, 8, seed=0, num_epochs=2, process_index=i,
                                          process_count=2)) for i in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole)
  for g, batch in enumerate(whole):  # process i: rows [i * 4, (i + 1) * 4)
    np.testing.assert_array_equal(np.concatenate([parts[0][g], parts[1][g]]), batch)


def test_evaluation_covers_the_split_once_padded_and_masked():
  data = integers(4, n_test=18)
  for count in (1, 2):
    rows = [stream.eval_dataset(data, 8, i, count) for i in range(count)]
    labels, masks = [], []
    for g in range(3):  # ceil(18 / 8) global batches, each split across the processes
      for part in rows:
        labels.append(part[g]['label'])
        masks.append(part[g]['mask'])
    labels, masks = np.concatenate(labels), np.concatenate(masks)
    assert len(labels) == 24 and masks.sum() == 18 and not masks[18:].any()
    np.testing.assert_array_equal(labels[:18], np.arange(1, 19))


def test_iterator_position_is_the_step_and_restores():
  ds = stream.train_dataset(integers(50), 8, seed=0, num_epochs=2)
  it = stream.iterate(ds, 0)
  first = [next(it)['label'] for _ in range(5)]
  assert it.get_state() == {'next_index': 5}
  again = stream.iterate(ds, 0)
  again.set_state({'next_index': 3})
  np.testing.assert_array_equal(next(again)['label'], first[3])


def pictures(n, size=12):
  rng = np.random.default_rng(0)
  records = [{'image': rng.integers(0, 255, (size, size, 3), np.uint8), 'label': i}
             for i in range(n)]
  return stream.StreamData(records, records, functools.partial(
      stream.decode_tfds, image_size=size, fixed=True),
      input_pipeline.DatasetSpec('pictures', (size, size, 3), ('a', 'b')), 'pictures')


@pytest.mark.parametrize('augment', [stream.Augment('pad', 2, True), stream.Augment('resized')])
def test_host_augmentation_is_seeded_by_the_examples_index(augment):
  data = pictures(16)
  ds = stream.train_dataset(data, 4, seed=1, num_epochs=2, augment=augment)
  plain = stream.train_dataset(data, 4, seed=1, num_epochs=2)
  batches = [ds[k] for k in range(len(ds))]
  for k in (5, 2, 7):  # any order, any worker: element k is always the same
    np.testing.assert_array_equal(ds[k]['image'], batches[k]['image'])
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches]),
                                np.concatenate([plain[k]['label'] for k in range(len(plain))]))
  changed = [not np.array_equal(batches[k]['image'], plain[k]['image']) for k in range(8)]
  assert sum(changed) >= 6 and batches[0]['image'].shape == (4, 12, 12, 3)
  # The same picture in its two epochs is augmented differently.
  first = {int(l): im for b in batches[:4] for l, im in zip(b['label'], b['image'])}
  second = {int(l): im for b in batches[4:] for l, im in zip(b['label'], b['image'])}
  assert sum(not np.array_equal(first[i], second[i]) for i in first) >= 12


def test_resized_crop_boxes_are_torchvisions():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, right, bottom = stream.resized_crop_box(40, 30, rng)
    assert 0 <= left < right <= 40 and 0 <= top < bottom <= 30
    assert 0.07 <= (right - left) * (bottom - top) / 1200 <= 1.0
  # No box of 8% of a 100x2 strip has an aspect within 3/4-4/3: the centre at aspect 4/3.
  assert stream.resized_crop_box(100, 2, np.random.default_rng(0)) == (48, 0, 51, 2)


# ----------------------------------------------------------------------------- the loop


def test_streamed_run_saves_its_position_and_sampled_statistics(reference, folder):
  steps = sorted(int(p.name) for p in (reference / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps == [6, 8, 12]
  for step in steps:
    saved = json.loads((reference / 'checkpoints' / str(step) / 'data' /
                        'process_0-of-1.json').read_text())
    assert saved == {'next_index': step}
  _, spec = state_lib.read_run(reference)
  memory = input_pipeline.load_dataset('image_folder', data_dir=str(folder), image_size=16)
  mean, std = input_pipeline.channel_stats(memory.train_images)  # the sample is all 48 here
  np.testing.assert_allclose(spec.normalization[0], mean, rtol=1e-6)
  np.testing.assert_allclose(spec.normalization[1], std, rtol=1e-6)
  assert [row['epoch'] for row in history(reference)] == [1, 2]


def test_stream_and_memory_evaluate_a_checkpoint_alike(reference, folder):
  config = stream_config(folder, eval_batch_size=8)  # 18 test images: the last batch masked
  state, _ = final_state(reference, config)
  spec = input_pipeline.DatasetSpec.from_json(checkpoint.read_dataset_spec(reference))
  runner = parallel.make_runner(config)
  eval_fn = train.compile_eval(runner, TinyNet(num_classes=3), config.image_size, spec)
  variables = runner.put_state(state.variables)
  memory = input_pipeline.load_dataset('image_folder', data_dir=str(folder), image_size=16)
  in_memory = train.evaluate(runner, eval_fn, variables, memory.test_images, memory.test_labels, 8)
  data = stream.load(config)
  streamed = train.evaluate_batches(runner, eval_fn, variables, stream.eval_batches(data, 8, 0))
  assert streamed['count'] == in_memory['count'] == 18
  assert streamed['accuracy'] == in_memory['accuracy']
  assert streamed['loss'] == in_memory['loss']
  np.testing.assert_array_equal(streamed['confusion'], in_memory['confusion'])
  assert history(reference)[-1]['test_acc'] == streamed['accuracy']


KILL_CHILD = '''
import os, signal, sys, time
from pathlib import Path
sys.path[:0] = [{repo!r}, {tests!r}]
import test_stream as ts
workdir = Path({workdir!r})

def kill_after_5(step):
  if step == 5:  # once checkpoint 4 is committed; the workers still have batches to make
    deadline = time.monotonic() + 120
    while not (workdir / 'checkpoints' / '4').is_dir() and time.monotonic() < deadline:
      time.sleep(0.05)
    import psutil  # the Grain workers, which must not outlive this process
    (workdir / 'children').write_text(' '.join(
        str(c.pid) for c in psutil.Process().children() if 'spawn_main' in ' '.join(c.cmdline())))
    os.kill(os.getpid(), signal.SIGKILL)

if __name__ == '__main__':
  ts.run(ts.stream_config(Path({folder!r}), data_workers=1), workdir, after_step=kill_after_5)
'''


def test_resume_after_sigkill_with_a_worker_is_exact(reference, folder, tmp_path, capsys):
  workdir = tmp_path / 'killed'
  killed = subprocess.run([sys.executable, '-c', KILL_CHILD.format(
      repo=str(REPO), tests=str(REPO / 'tests'), workdir=str(workdir), folder=str(folder))],
      capture_output=True, text=True, timeout=120)  # a worker left alive holds the pipes
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  workers = [int(pid) for pid in (workdir / 'children').read_text().split()]
  assert len(workers) == 1
  deadline = time.monotonic() + 5  # they die with it (without: still there after minutes)
  while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
            for p in workers) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                 for p in workers), 'a Grain worker outlived the killed run'
  assert not (workdir / 'metrics.jsonl').exists() or not history(workdir)
  # Resumed with the same command (its worker count); the data, hence the numbers, are the
  # reference's (no workers).
  assert run(stream_config(folder, data_workers=1), workdir) == 0
  assert 'resuming from the checkpoint at step 4' in capsys.readouterr().out
  config = stream_config(folder)
  state, step = final_state(workdir, config)
  expected, expected_step = final_state(reference, config)
  assert step == expected_step == 12
  chex.assert_trees_all_equal(state, expected)  # params, optimizer, rng, metric sums: bitwise
  assert history(workdir) == history(reference)
  saved = json.loads((workdir / 'checkpoints' / '12' / 'data' / 'process_0-of-1.json').read_text())
  assert saved != {'next_index': 12}  # the workers' own state format
  # A resume with another worker count is refused, naming the key.
  assert run(stream_config(folder, data_workers=0, num_epochs=3), workdir) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'data_workers: 1 in checkpoint, 0 now' in err, err
  assert 'Traceback' not in err and err.count('\n') == 1


def test_switching_between_memory_and_stream_on_resume_is_refused(reference, folder, tmp_path,
                                                                   capsys):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  assert run(stream_config(folder, input='memory', num_epochs=3), workdir) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'trained with input=stream' in err, err
  assert stream.choose_input(stream_config(folder, input='auto'),
                             stream.saved_stream(workdir))[0] == 'stream'


def test_a_damaged_image_stops_with_one_line_and_the_run_continues_once_fixed(folder, tmp_path,
                                                                                capsys):
  data_dir = tmp_path / 'shapes'
  shutil.copytree(folder, data_dir)
  damaged = data_dir / 'train' / 'cross' / 'cross_1.jpg'
  good = damaged.read_bytes()
  damaged.write_bytes(good[:40])  # cut short, as a copy that failed
  workdir = tmp_path / 'run'
  config = stream_config(data_dir, normalize=False, checkpoint_every_steps=1)
  assert run(config, workdir) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: {damaged}: cannot be read as an image') and err.count('\n') == 1
  assert 'is intact' in err and 'rerun the same command' in err and 'Traceback' not in err
  saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved and final_state(workdir, config)[1] == saved[-1]  # readable
  damaged.write_bytes(good)
  assert run(config, workdir) == 0
  assert [row['epoch'] for row in history(workdir)] == [1, 2]


def test_stream_cache_streams_the_same_batches_from_pixels_decoded_once(folder, tmp_path,
                                                                         monkeypatch):
  """``stream_cache``: each split decoded once into a file, then the same training batches
  (pad-crop and flip on the host), evaluation batches and statistics as from the JPEGs."""
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  config = stream_config(folder, stream_cache=True)
  augment = stream.Augment.from_config(config)
  assert augment.active and augment.crop == 'pad'
  files, cached = stream.load(stream_config(folder)), stream.load(config)
  written = sorted(p.name for p in (tmp_path / 'cache').rglob('*') if p.is_file())
  assert len(written) == 2 and written[0].endswith('-test.npy')  # no partial file left
  assert cached.spec == files.spec  # the classes, and the sampled statistics
  for make in (lambda d: stream.train_dataset(d, 8, seed=2, num_epochs=2, augment=augment),
               lambda d: stream.eval_dataset(d, 8)):
    want, got = make(files), make(cached)
    assert len(got) == len(want) > 1
    for k in range(len(want)):
      chex.assert_trees_all_equal(got[k], want[k])
  # Read again, the files are used as they are: nothing is decoded.
  monkeypatch.setattr(stream.image_folder, 'load_rgb', lambda *a: pytest.fail('decoded again'))
  again = stream.load(config)
  chex.assert_trees_all_equal(again.decode(again.train[3]), cached.decode(cached.train[3]))


def test_a_damaged_image_stops_the_stream_cache_naming_it_and_leaves_no_file(folder, tmp_path,
                                                                             monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  data_dir = tmp_path / 'shapes'
  shutil.copytree(folder, data_dir)
  damaged = data_dir / 'test' / 'square' / 'square_0.png'
  damaged.write_bytes(damaged.read_bytes()[:30])
  with pytest.raises(DatasetError, match=re.escape(f'{damaged}: not an image Pillow can read')):
    stream.load(stream_config(data_dir, stream_cache=True))
  assert not [p for p in (tmp_path / 'cache').rglob('*') if p.is_file() and 'test' in p.name]
  with pytest.raises(ConfigError, match='stream_cache decodes image folders once'):
    stream.load(stream_config(data_dir, dataset='mnist', data_source='tfds', stream_cache=True))


# ----------------------------------------------------------------------------- choices


def test_auto_streams_what_would_not_fit_in_memory(folder, monkeypatch):
  config = stream_config(folder, input='auto')
  kind, why = stream.choose_input(config)
  assert kind == 'memory' and 'within' in why
  monkeypatch.setenv(input_pipeline.MEMORY_LIMIT_ENV, '0.01')  # 10 KiB: 66 x 16x16x3 do not fit
  kind, why = stream.choose_input(config)
  assert kind == 'stream' and '66 images at 16x16x3' in why and 'over' in why
  with pytest.raises(Exception, match='--config.input=stream'):
    input_pipeline.load_dataset('image_folder', data_dir=str(folder), image_size=16)
  fashion = stream_config(folder, input='auto', dataset='fashion_mnist', data_dir='')
  assert stream.choose_input(fashion)[0] == 'memory'


def test_idx_files_are_not_streamed(folder):
  with pytest.raises(ConfigError, match='use --config.input=memory'):
    stream.load(stream_config(folder, dataset='fashion_mnist', data_dir=''))


def test_changed_process_count_is_refused(reference, tmp_path):
  manager = checkpoint.open_manager(reference, read_only=True)
  try:
    it = stream.iterate(stream.train_dataset(integers(50), 8, 0, 2), 0)
    with pytest.raises(CheckpointError, match=r'another number of processes \(process_0-of-1'):
      stream.restore_position(manager, 8, it, process_index=0, process_count=2)
  finally:
    manager.close()


def test_tfds_sets_stream_as_memory_reads_them(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = stream_config('', dataset='oxford_flowers102', data_source='tfds', image_size=20,
                         batch_size=4, num_epochs=1, normalize=True)
  with tfds.testing.mock_data(num_examples=8):
    data = stream.load(config)
    memory = input_pipeline.load_dataset('oxford_flowers102', 'tfds', image_size=20)
    streamed = stream.sample_images(data.train, data.decode, 100)
    np.testing.assert_array_equal(streamed, memory.train_images)  # fitted alike, in order
    assert data.spec.normalization == input_pipeline.channel_stats(memory.train_images)
    summary = train.train_and_evaluate(config, tmp_path, model=TinyNet(num_classes=102))
  assert summary['step'] == 2 and np.isfinite(summary['train_loss'])
  assert (tmp_path / 'checkpoints' / '2' / 'data' / 'process_0-of-1.json').is_file()


def test_the_evaluate_command_streams_a_streamed_run(reference, monkeypatch):
  from gnet_jax import evaluate
  monkeypatch.setattr(state_lib, 'create_model',
                      lambda config, spec: TinyNet(num_classes=spec.num_classes))
  monkeypatch.setattr(input_pipeline, 'load_dataset', None)  # not read into memory
  result = evaluate.evaluate_checkpoint(reference, num_examples=5)
  assert result['count'] == 18 and result['step'] == 12
  assert result['accuracy'] == history(reference)[-1]['test_acc']
  assert result['examples']['images'].shape == (5, 16, 16, 3)


# ----------------------------------------------------------------------------- two processes

TWO_PROCESS_CHILD = '''
import os, re, signal, sys, time
from pathlib import Path
sys.path[:0] = [{repo!r}, {tests!r}]
import test_stream as ts  # imports conftest, which asks for 8 CPU devices ...
os.environ['XLA_FLAGS'] = re.sub(r'count=\\d+', 'count=2', os.environ['XLA_FLAGS'])  # ... 2 here
from gnet_jax import parallel
workdir = Path({workdir!r})
config = ts.stream_config(Path({folder!r}), parallelism='sharded', distributed=True,
                          coordinator_address={address!r}, num_processes=2, process_id={pid})
parallel.maybe_initialize_distributed(config)

def kill_after_10(step):
  if {kill} and step == 10:  # both processes, once checkpoint 8 is committed
    deadline = time.monotonic() + 120
    while not (workdir / 'checkpoints' / '8').is_dir() and time.monotonic() < deadline:
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)

sys.exit(ts.run(config, workdir, after_step=kill_after_10))
'''


def start_two_processes(folder, workdir, kill):
  from test_multihost import free_port
  address = f'127.0.0.1:{free_port()}'
  workdir.parent.mkdir(parents=True, exist_ok=True)
  procs = []
  for pid in range(2):
    code = TWO_PROCESS_CHILD.format(repo=str(REPO), tests=str(REPO / 'tests'), folder=str(folder),
                                    workdir=str(workdir), address=address, pid=pid, kill=kill)
    procs.append(subprocess.Popen([sys.executable, '-c', code], cwd=REPO, env=child_env(2),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
  return procs


def finish(procs, timeout=400):
  try:
    return [(p.wait(timeout=timeout), p.stderr.read()) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def test_two_processes_resume_after_sigkill_exactly(folder, tmp_path):
  reference, workdir = tmp_path / 'reference', tmp_path / 'killed'
  pairs = [start_two_processes(folder, reference, False),
           start_two_processes(folder, workdir, True)]  # at once: two cores, four processes
  uninterrupted, killed = finish(pairs[0]), finish(pairs[1])
  assert [code for code, _ in uninterrupted] == [0, 0], uninterrupted[0][1][-3000:]
  assert [code for code, _ in killed] == [-signal.SIGKILL] * 2, killed[0][1][-3000:]
  saved = workdir / 'checkpoints' / '8' / 'data'
  assert sorted(p.name for p in saved.glob('*.json')) == ['process_0-of-2.json',
                                                          'process_1-of-2.json']
  resumed = finish(start_two_processes(folder, workdir, False))
  assert [code for code, _ in resumed] == [0, 0], resumed[0][1][-3000:]
  config = stream_config(folder)
  state, step = final_state(workdir, config)
  expected, expected_step = final_state(reference, config)
  assert step == expected_step == 12
  chex.assert_trees_all_equal(state, expected)
  assert history(workdir) == history(reference)


def test_decode_benchmark_runs_and_reports_cores(tmp_path):
  """``python -m benchmarks.stream decode`` at a tiny size (its figures are measured quietly)."""
  out = subprocess.run([sys.executable, '-m', 'benchmarks.stream', 'decode', '--out',
                        str(tmp_path), '--decode-images', '3', '--seconds', '0.05', '--sizes',
                        '16', '--json', str(tmp_path / 'decode.json')],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert '| 16x16 |' in out.stdout and 'cores for 20,000/s' in out.stdout
  saved = json.loads((tmp_path / 'decode.json').read_text())
  for key in ('decode_images_per_s', 'decode_augment_images_per_s'):
    assert saved[key]['16'] > 0

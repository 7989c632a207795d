"""``python -m gnet_jax.export``: ONNX and ``jax.export`` files that predict as the run does.

Two runs are made once each, in-process at the smallest shapes: the d2l
network trained for four steps at 28x28 (conftest's ``book_run``, which
test_replay.py replays), and torchvision's GoogLeNet fine-tuned for two
steps at 32x32 from a torchvision file (``configs/finetune.py``: ImageNet
normalisation, ``transform_input``, BatchNorm statistics updating). Each is
exported to both formats (``inception_v1`` with BatchNorm folded and kept);
onnxruntime runs the ONNX files here, and one Python process that cannot
import ``gnet_jax`` (outside the project, ``python -S`` with only the
site-packages folders of JAX's own dependencies on its path) runs every JAX
artifact. Both must give the logits that predict's computation gives on each
run's test images, within 1e-4, and the same top-1 on all of them.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import finetune
from gnet_jax import export, input_pipeline, state as state_lib, train
import image_folders

torch = pytest.importorskip('torch')
ort = pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')

ATOL = 1e-4
RUNS = ('d2l', 'inception_v1')
# (run, format, batchnorm): the artifacts the module exports.
ARTIFACTS = [(run, fmt, bn) for run in RUNS for fmt in export.FORMATS
             for bn in (('fold', 'keep') if run == 'inception_v1' else ('fold',))]


@pytest.fixture(scope='module')
def inception_run(tmp_path_factory) -> Path:
  """configs/finetune.py from a torchvision file (random weights, 1,000 classes, aux heads) on
  three classes of pictures at 32x32: two steps, every block and BatchNorm training."""
  from gnet_jax import torch_reference
  folder = image_folders.make_folder(tmp_path_factory.mktemp('pictures'),
                                     {'train': 4, 'test': 3})
  torch.manual_seed(0)
  net = torch_reference.torchvision_models().googlenet(weights=None, aux_logits=True,
                                                       init_weights=True)
  # Running statistics of one batch of pictures in [-1, 1] (what transform_input feeds), as a
  # pretrained network has its data's: with torchvision's initial (0, 1) the signal fades to
  # nothing by the classifier at this size.
  for layer in net.modules():
    if isinstance(layer, torch.nn.BatchNorm2d):
      layer.reset_running_stats()
      layer.momentum = None  # a cumulative average: of one batch, that batch's statistics
  rng = np.random.default_rng(1)
  pictures = np.stack([image_folders.picture(name, rng, (32, 32))
                       for name in image_folders.CLASSES * 4]) / np.float32(127.5) - 1
  with torch.no_grad():
    net.train()(torch.from_numpy(pictures.transpose(0, 3, 1, 2)).float())
  source = tmp_path_factory.mktemp('source') / 'googlenet.pth'
  torch.save(net.state_dict(), source)
  config = finetune.get_config()
  config.update(image_size=32, batch_size=4, train_examples=8, num_epochs=1, data_dir=str(folder),
                init_from=str(source), parallelism='none', progress=False, log_every_steps=0,
                max_checkpoints=0, warmup_epochs=0.0)
  workdir = tmp_path_factory.mktemp('inception_run')
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def runs(book_run, inception_run) -> dict[str, Path]:
  return {'d2l': book_run, 'inception_v1': inception_run}


@pytest.fixture(scope='module')
def checkpoints(runs) -> dict[str, state_lib.Checkpoint]:
  """Each run's checkpoint, loaded once."""
  return {name: state_lib.load_checkpoint(workdir) for name, workdir in runs.items()}


@pytest.fixture(scope='module')
def references(checkpoints) -> dict[str, dict]:
  """Per run: its test images as the exported models take them (float32 NHWC in [0, 1] at
  ``image_size``) and the logits of predict's computation (``preprocess``, ``model.apply``)."""
  out = {}
  for name, (state, config, _, spec) in checkpoints.items():
    data = input_pipeline.load_dataset(config.dataset, config.data_source, config.data_dir,
                                       train_examples=0, eval_examples=-1,
                                       splits=(config.train_split, config.test_split),
                                       image_size=config.image_size)
    model = state_lib.create_model(config, spec)
    size, norm = config.image_size, spec.normalization
    logits = jax.jit(lambda v, x: model.apply(v, input_pipeline.preprocess(x, size, norm)))(
        state.variables, data.test_images)
    out[name] = {'images': np.asarray(input_pipeline.preprocess(data.test_images, size)),
                 'logits': np.asarray(logits), 'spec': spec, 'config': config}
  return out


@pytest.fixture(scope='module')
def exported(runs, checkpoints, tmp_path_factory) -> dict[tuple[str, str, str], Path]:
  """Every artifact of ``ARTIFACTS``: the d2l ONNX file through the command line, the others
  from one load of each run's checkpoint."""
  folder = tmp_path_factory.mktemp('exported')
  paths = {key: folder / f'{key[0]}_{key[2]}.{key[1]}' for key in ARTIFACTS}
  assert export.main(['--workdir', str(runs['d2l']), '--format', 'onnx',
                      '--out', str(paths['d2l', 'onnx', 'fold'])]) == 0
  for key in ARTIFACTS:
    if key != ('d2l', 'onnx', 'fold'):
      export.export_checkpoint(checkpoints[key[0]], key[1], paths[key], batchnorm=key[2])
  return paths


def assert_same_predictions(logits: np.ndarray, reference: np.ndarray, what: str) -> None:
  assert logits.shape == reference.shape, what
  assert np.ptp(reference, axis=0).max() > 1e-3, f'{what}: the images get the same logits'
  np.testing.assert_allclose(logits, reference, rtol=0, atol=ATOL, err_msg=what)
  assert np.array_equal(logits.argmax(-1), reference.argmax(-1)), what


def test_the_runs_are_trained_and_fine_tuned(checkpoints):
  d2l, inception = checkpoints['d2l'], checkpoints['inception_v1']
  assert (d2l.config.model, int(d2l.step)) == ('d2l', 4)
  assert (inception.config.model, int(inception.step)) == ('inception_v1', 2)
  assert inception.config.init_from and inception.config.transform_input
  stats = inception.state.batch_stats['inception4a']['branch2_1']['bn']
  assert not np.allclose(stats['mean'], 0) and not np.allclose(stats['var'], 1)


# ----------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize('run,bn', [(r, b) for r, f, b in ARTIFACTS if f == 'onnx'])
def test_onnxruntime_predicts_as_the_run(exported, references, run, bn):
  ref = references[run]
  session = ort.InferenceSession(str(exported[run, 'onnx', bn]),
                                 providers=['CPUExecutionProvider'])
  (inp,), (out,) = session.get_inputs(), session.get_outputs()
  size, channels = ref['config'].image_size, ref['spec'].image_shape[-1]
  assert (inp.name, out.name) == ('images', 'logits')
  assert inp.shape == ['batch', channels, size, size], 'the batch dimension is dynamic'
  images = ref['images'].transpose(0, 3, 1, 2)  # NCHW
  logits = session.run(None, {'images': images})[0]
  assert_same_predictions(logits, ref['logits'], f'{run} onnx {bn}')
  one = session.run(None, {'images': images[1:2]})[0]
  np.testing.assert_allclose(one, ref['logits'][1:2], rtol=0, atol=ATOL)


@pytest.mark.parametrize('run,bn', [(r, b) for r, f, b in ARTIFACTS if f == 'onnx'])
def test_onnx_batchnorm_is_folded_or_kept_as_asked(exported, run, bn):
  import onnx
  ops = [n.op_type for n in onnx.load(exported[run, 'onnx', bn]).graph.node]
  kept = ops.count('BatchNormalization')
  assert ops.count('Conv') == 57
  assert kept == (57 if (run, bn) == ('inception_v1', 'keep') else 0)


def test_onnx_metadata_is_the_input_contract_and_class_names(exported, references):
  for run in RUNS:
    session = ort.InferenceSession(str(exported[run, 'onnx', 'fold']),
                                   providers=['CPUExecutionProvider'])
    meta = json.loads(session.get_modelmeta().custom_metadata_map['gnet_jax'])
    spec, config = references[run]['spec'], references[run]['config']
    assert meta['class_names'] == list(spec.class_names)
    assert (meta['model'], meta['format'], meta['dataset']) == (run, 'onnx', spec.name)
    inp = meta['input']
    assert inp['layout'] == 'NCHW' and inp['dtype'] == 'float32'
    assert inp['shape'] == ['batch', spec.image_shape[-1], config.image_size, config.image_size]
    assert inp['value_range'] == [0.0, 1.0]
    assert meta['output']['shape'] == ['batch', spec.num_classes]
  d2l, inception = (json.loads(ort.InferenceSession(str(exported[r, 'onnx', 'fold']))
                               .get_modelmeta().custom_metadata_map['gnet_jax']) for r in RUNS)
  assert d2l['input']['normalization'] is None and d2l['batchnorm'] == 'none'
  assert d2l['input']['color'] == 'grey' and d2l['step'] == 4
  assert inception['input']['normalization'] == {
      'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225], 'inside_model': True}
  assert inception['input']['transform_input'] and inception['batchnorm'] == 'folded'
  assert inception['class_names'] == list(image_folders.CLASSES)


# ----------------------------------------------------------------------------- JAX


JAX_ONLY = '''
import importlib.util, json, sys
assert importlib.util.find_spec('gnet_jax') is None, 'gnet_jax can be found'
try:
  import gnet_jax
except ImportError:
  pass
else:
  raise SystemExit('gnet_jax was imported')
import jax
import numpy as np
results = []
for job in json.loads(sys.argv[1]):
  with open(job['artifact'], 'rb') as f:
    exp = jax.export.deserialize(bytearray(f.read()))
  with open(job['artifact'] + '.json') as f:
    meta = json.load(f)
  images = np.load(job['images'])
  np.save(job['out'], np.asarray(exp.call(images)))
  np.save(job['out_one'], np.asarray(exp.call(images[1:2])))
  results.append({'platforms': list(exp.platforms), 'input': str(exp.in_avals[0].shape),
                  'classes': meta['class_names']})
print(json.dumps(results))
'''


@pytest.fixture(scope='module')
def jax_only(exported, references, tmp_path_factory) -> dict:
  """Runs every JAX artifact in one process that cannot import gnet_jax; its outputs."""
  folder = tmp_path_factory.mktemp('jax_only')
  jobs, keys = [], [key for key in exported if key[1] == 'jax']
  for run, _, bn in keys:
    np.save(folder / f'{run}_images.npy', references[run]['images'])
    jobs.append({'artifact': str(exported[run, 'jax', bn]),
                 'images': str(folder / f'{run}_images.npy'),
                 'out': str(folder / f'{run}_{bn}.npy'), 'out_one': str(folder / f'{run}_{bn}_1.npy')})
  # JAX and what it imports, from their own folders, with no .pth file run (python -S), so
  # neither the project nor an editable install of it is on the path.
  dependencies = ('jax', 'jaxlib', 'numpy', 'ml_dtypes', 'opt_einsum', 'scipy', 'flatbuffers')
  paths = sorted({str(Path(importlib.import_module(m).__file__).parents[1]) for m in dependencies})
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env['PYTHONPATH'] = os.pathsep.join(paths)
  assert not any(Path(p, 'gnet_jax').exists() for p in paths), paths
  done = subprocess.run([sys.executable, '-S', '-c', JAX_ONLY, json.dumps(jobs)], cwd=folder,
                        env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(done.stdout.strip().splitlines()[-1])
  return {key: {**result, 'logits': np.load(job['out']), 'one': np.load(job['out_one'])}
          for key, job, result in zip(keys, jobs, results)}


@pytest.mark.parametrize('run,bn', [(r, b) for r, f, b in ARTIFACTS if f == 'jax'])
def test_plain_jax_predicts_as_the_run_without_gnet_jax(jax_only, references, run, bn):
  result, ref = jax_only[run, 'jax', bn], references[run]
  assert result['platforms'] == ['cpu', 'cuda', 'tpu']
  size, channels = ref['config'].image_size, ref['spec'].image_shape[-1]
  assert result['input'] == f'(batch, {size}, {size}, {channels})', 'the batch is symbolic'
  assert result['classes'] == list(ref['spec'].class_names)
  assert_same_predictions(result['logits'], ref['logits'], f'{run} jax {bn}')
  np.testing.assert_allclose(result['one'], ref['logits'][1:2], rtol=0, atol=ATOL)


def test_jax_metadata_beside_the_artifact_is_the_onnx_contract_in_nhwc(exported):
  for run in RUNS:
    beside = json.loads(export.metadata_path(exported[run, 'jax', 'fold']).read_text())
    inside = json.loads(ort.InferenceSession(str(exported[run, 'onnx', 'fold']))
                        .get_modelmeta().custom_metadata_map['gnet_jax'])
    assert beside['format'] == 'jax' and beside['input']['layout'] == 'NHWC'
    b, c, h, w = inside['input']['shape']
    assert beside['input']['shape'] == [b, h, w, c]
    for meta in (beside, inside):
      del meta['format'], meta['input']['layout'], meta['input']['shape']
    assert beside == inside


@pytest.mark.parametrize('bn', ['fold', 'keep'])
def test_jax_batchnorm_is_folded_or_kept_as_asked(exported, bn):
  """A kept BatchNorm is one rsqrt per convolution in the StableHLO; folded, there is none."""
  data = exported['inception_v1', 'jax', bn].read_bytes()
  text = jax.export.deserialize(bytearray(data)).mlir_module()
  assert text.count('stablehlo.convolution') % 57 == 0  # per platform where lowerings differ
  assert text.count('stablehlo.rsqrt') == (57 if bn == 'keep' else 0)


def test_the_folded_network_has_convolutions_with_biases_and_no_batchnorm(checkpoints):
  from gnet_jax import inception_v1
  loaded = checkpoints['inception_v1']
  model, variables = export.inference_network(loaded.config, loaded.spec, loaded.state.variables,
                                              'fold')
  assert model.batchnorm_folded and not model.aux_logits and model.kernels == 'xla'
  assert set(variables) == {'params'} and 'aux1' not in variables['params']
  assert set(variables['params']['conv1']) == {'conv'}
  assert variables['params']['conv1']['conv']['bias'].shape == (64,)
  folded = inception_v1.fold_batchnorm(loaded.state.variables)
  assert set(folded['inception3a']['branch1']['conv']) == {'kernel', 'bias'}


def test_the_readme_example_classifies_images_as_predict_does(runs, checkpoints, exported,
                                                              capsys):
  """The README's onnxruntime lines on the run's test files: ``predict``'s top class for each."""
  from gnet_jax import predict
  readme = (Path(__file__).resolve().parent.parent / 'README.md').read_text()
  code = readme.split('## Use the model elsewhere')[1].split('```python\n')[1].split('```')[0]
  assert "'pets.onnx'" in code and "'photo.jpg'" in code
  folder = Path(checkpoints['inception_v1'].config.data_dir) / 'test'
  files = sorted(p for p in folder.rglob('*') if p.is_file())
  answers = predict.predict_images(runs['inception_v1'], files)
  printed = []
  for path in files:
    exec(code.replace("'pets.onnx'", repr(str(exported['inception_v1', 'onnx', 'fold'])))
         .replace("'photo.jpg'", repr(str(path))), {})
    printed.append(capsys.readouterr().out.strip())
  assert len(files) == 9 and printed == [a['top'][0]['name'] for a in answers]


# ----------------------------------------------------------------------------- bad input


def command(capsys, *argv) -> tuple[int, list[str]]:
  status = export.main(list(argv))
  return status, capsys.readouterr().err.strip().splitlines()


def test_a_workdir_without_a_checkpoint_is_one_error_line(tmp_path, capsys):
  out = tmp_path / 'model.onnx'
  status, err = command(capsys, '--workdir', str(tmp_path / 'empty'), '--format', 'onnx',
                        '--out', str(out))
  assert status == 2 and len(err) == 1 and err[0].startswith('error: '), err
  assert sorted(os.listdir(tmp_path)) == []


def test_an_unknown_format_is_one_error_line(book_run, tmp_path, capsys):
  status, err = command(capsys, '--workdir', str(book_run), '--format', 'tflite',
                        '--out', str(tmp_path / 'model.tflite'))
  assert (status, err) == (2, ["error: --format 'tflite' is not one of onnx, jax"])
  status, err = command(capsys, '--workdir', str(book_run), '--format', 'onnx', '--batchnorm',
                        'drop', '--out', str(tmp_path / 'model.onnx'))
  assert (status, err) == (2, ["error: --batchnorm 'drop' is not one of fold, keep"])
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('fmt', export.FORMATS)
def test_an_output_path_that_cannot_be_written_is_one_error_line(book_run, tmp_path, capsys, fmt):
  for out in (tmp_path / 'missing' / f'model.{fmt}', tmp_path):
    status, err = command(capsys, '--workdir', str(book_run), '--format', fmt, '--out', str(out))
    assert status == 2 and len(err) == 1 and err[0].startswith('error: '), err
  assert os.listdir(tmp_path) == []


def test_a_missing_package_is_named_before_anything_is_read(book_run, tmp_path, capsys,
                                                            monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'onnxscript' else real(name, *a))
  status, err = command(capsys, '--workdir', str(book_run), '--format', 'onnx',
                        '--out', str(tmp_path / 'model.onnx'))
  assert status == 2 and len(err) == 1 and 'gnet-jax[export]' in err[0], err
  assert 'onnxscript' in err[0] and os.listdir(tmp_path) == []

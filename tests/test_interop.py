"""PyTorch weight import/export: exact round trips, clear errors, and the import/export CLI."""

import collections
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from gnet_jax import torch_reference  # noqa: E402
from conftest import REPO, make_images  # noqa: E402
from gnet_jax import interop, models, state as state_lib  # noqa: E402
from gnet_jax.errors import DependencyError  # noqa: E402


@pytest.fixture(scope='module')
def net():
  torch.manual_seed(0)
  return torch_reference.googlenet(1, 10)


@pytest.fixture(scope='module')
def state_dict(net):
  return net.state_dict()


def assert_state_dicts_equal(got, expected):
  assert list(got) == list(expected)  # same keys, same (PyTorch) order
  for key in expected:
    assert got[key].dtype == expected[key].dtype, key
    assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(expected[key])), key


@pytest.mark.parametrize('in_channels, num_classes', [(1, 10), (3, 7)])
def test_round_trip_is_exact(in_channels, num_classes):
  torch.manual_seed(in_channels)
  sd = torch_reference.googlenet(in_channels, num_classes).state_dict()
  params = interop.params_from_torch(sd)
  assert_state_dicts_equal(interop.params_to_torch(params), sd)
  # ... and again from NumPy arrays, without torch in the loop.
  numpy_sd = interop.params_to_torch(params, numpy=True)
  assert all(isinstance(v, np.ndarray) for v in numpy_sd.values())
  back = interop.params_to_torch(interop.params_from_torch(numpy_sd), numpy=True)
  assert list(back) == list(sd)
  for key in sd:
    np.testing.assert_array_equal(back[key], sd[key].numpy())


def test_params_have_the_model_tree():
  sd = torch_reference.googlenet(3, 7).state_dict()
  params = interop.params_from_torch(sd)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  expected = jax.eval_shape(models.GoogLeNet(num_classes=7).init, jax.random.key(0), x)['params']
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, expected)
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))
  # Layout: OIHW -> HWIO for convs, (out, in) -> (in, out) for the classifier.
  np.testing.assert_array_equal(params['b3']['inception1']['p2_2']['kernel'][1, 2, 5, 7],
                                sd['2.0.p2_2.weight'][7, 5, 1, 2].numpy())
  np.testing.assert_array_equal(params['head']['kernel'], sd['5.weight'].numpy().T)
  np.testing.assert_array_equal(params['b1']['conv']['bias'], sd['0.0.bias'].numpy())


def test_converted_params_do_not_alias_the_tensors(state_dict):
  params = interop.params_from_torch(state_dict)
  assert not np.shares_memory(params['head']['bias'], state_dict['5.bias'].numpy())


def test_params_to_torch_loads_into_the_reference(state_dict):
  params = interop.params_from_torch(state_dict)
  other = torch_reference.googlenet(1, 10)
  other.load_state_dict(interop.params_to_torch({'params': params}), strict=True)
  assert_state_dicts_equal(other.state_dict(), state_dict)


def test_aux_heads_are_kept_fresh_on_import_and_dropped_on_export(state_dict):
  imported = interop.params_from_torch(state_dict)
  fresh = state_lib.init_params(models.GoogLeNet(num_classes=10, aux_heads=True), 0, (28, 28, 1))
  merged = interop.merge_params(imported, fresh)
  assert set(merged) == set(imported) | {'aux1', 'aux2'}
  assert merged['aux1'] is fresh['aux1']
  assert merged['b4']['inception3']['p3_2']['kernel'] is \
      imported['b4']['inception3']['p3_2']['kernel']
  assert_state_dicts_equal(interop.params_to_torch(merged), state_dict)


def test_no_torch_needed_for_numpy(state_dict, monkeypatch):
  numpy_sd = {k: v.numpy().copy() for k, v in state_dict.items()}
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now fails
  params = interop.params_from_torch(numpy_sd)
  assert list(interop.params_to_torch(params, numpy=True)) == list(numpy_sd)
  with pytest.raises(DependencyError, match=r'gnet-jax\[interop\]'):
    interop.params_to_torch(params)
  with pytest.raises(DependencyError, match=r'pip install'):
    interop.load_torch_file('model.pt')


# ----------------------------------------------------------------------------- bad state dicts


def test_missing_key_is_named(state_dict):
  sd = collections.OrderedDict(state_dict)
  del sd['3.2.p3_2.bias']
  with pytest.raises(interop.StateDictError, match=r"missing state dict key '3\.2\.p3_2\.bias'"):
    interop.params_from_torch(sd)


def test_missing_classifier_is_named(state_dict):
  sd = {k: v for k, v in state_dict.items() if not k.startswith('5.')}
  with pytest.raises(interop.StateDictError, match=r"missing state dict key '5\.weight'"):
    interop.params_from_torch(sd)


def test_extra_key_is_named(state_dict):
  sd = dict(state_dict, **{'6.weight': torch.zeros(3)})
  with pytest.raises(interop.StateDictError, match=r"unexpected state dict key '6\.weight'"):
    interop.params_from_torch(sd)


def test_wrong_shape_is_named(state_dict):
  sd = dict(state_dict, **{'4.1.p2_2.weight': torch.zeros(384, 192, 5, 5)})
  with pytest.raises(interop.StateDictError,
                     match=r"'4\.1\.p2_2\.weight' has shape \(384, 192, 5, 5\), "
                           r"expected \(384, 192, 3, 3\)"):
    interop.params_from_torch(sd)


def test_integer_tensor_is_refused(state_dict):
  sd = dict(state_dict, **{'1.0.bias': torch.zeros(64, dtype=torch.int64)})
  with pytest.raises(interop.StateDictError, match=r"'1\.0\.bias' has dtype"):
    interop.params_from_torch(sd)


def test_bad_params_tree_is_named(state_dict):
  params = interop.params_from_torch(state_dict)
  del params['b5']['inception2']['p1_1']['bias']
  with pytest.raises(interop.StateDictError, match=r"missing parameter 'b5/inception2/p1_1/bias'"):
    interop.params_to_torch(params, numpy=True)


def test_other_networks_are_refused():
  with pytest.raises(interop.StateDictError, match='not a d2l GoogLeNet'):
    interop.params_from_torch(torch.nn.Sequential(
        torch.nn.Conv2d(1, 64, 7), torch.nn.Linear(1024, 10)).state_dict() | {'9.x': torch.ones(1)})


# ----------------------------------------------------------------------------- reading .pt files


def test_normalize_keys_of_variants(state_dict):
  # d2l 2.x names: b1_1 ... b4_2, layers under self.net; then wrapped by DataParallel.
  d2l2 = {f'module.net.{k.replace(".p", ".b")}': v for k, v in state_dict.items()}
  assert 'module.net.2.0.b3_2.weight' in d2l2
  sd, notes = interop.normalize_keys(d2l2)
  assert list(sd) == list(state_dict)
  assert len(notes) == 3
  assert interop.normalize_keys(state_dict) == (dict(state_dict), [])


def test_load_torch_file_accepts_documented_forms(net, state_dict, tmp_path):
  forms = {'sd.pt': state_dict, 'wrapped.pt': {'epoch': 3, 'model_state_dict': state_dict,
                                                 'optimizer': {'lr': 0.1}},
           'dp.pt': torch.nn.DataParallel(net).state_dict()}
  for name, obj in forms.items():
    torch.save(obj, tmp_path / name)
    sd, _ = interop.load_torch_file(tmp_path / name)
    assert_state_dicts_equal(collections.OrderedDict(sd), state_dict)


def test_pickled_model_needs_trust(net, state_dict, tmp_path):
  torch.save(net, tmp_path / 'full.pt')
  with pytest.raises(interop.StateDictError, match='--trust_pickle'):
    interop.load_torch_file(tmp_path / 'full.pt')
  sd, _ = interop.load_torch_file(tmp_path / 'full.pt', trust_pickle=True)
  assert_state_dicts_equal(collections.OrderedDict(sd), state_dict)


# ----------------------------------------------------------------------------- command line


def run_cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO), str(REPO / 'tests'), os.environ.get('PYTHONPATH', '')]))
  return subprocess.run([sys.executable, '-m', 'gnet_jax.interop', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_import_evaluate_export_round_trip(net, state_dict, idx_dir, tmp_path, capsys):
  from gnet_jax import evaluate, state as state_lib

  torch.save(state_dict, tmp_path / 'model.pt')
  workdir = tmp_path / 'run'
  overrides = ['--config.data_source=idx', f'--config.data_dir={idx_dir}',
               '--config.image_size=28', '--config.batch_size=16']
  done = run_cli('import', str(tmp_path / 'model.pt'), '--workdir', str(workdir),
                 '--config', str(REPO / 'configs' / 'fashion_mnist.py'), *overrides)
  assert done.returncode == 0, done.stderr
  assert 'python -m gnet_jax.evaluate --workdir' in done.stdout
  assert (workdir / 'config.json').is_file()

  # train.py resumes from it: the checkpoint fits the state it builds, under the same config.
  state, config, step, _ = state_lib.load_checkpoint(workdir)
  assert step == 0 and int(state.step) == 0
  assert config.dataset == 'fashion_mnist' and config.image_size == 28
  target = state_lib.build(config)[2]
  assert jax.tree.structure(target) == jax.tree.structure(state)

  # gnet_jax.evaluate scores it like PyTorch does.
  images, labels = make_images(40, seed=1)  # conftest's t10k split
  with torch.no_grad():
    logits = net(torch.from_numpy(images[:, None]).float() / 255.0)
  result = evaluate.evaluate_checkpoint(workdir)
  assert result['count'] == 40
  assert result['accuracy'] == pytest.approx(float((logits.argmax(1).numpy() == labels).mean()))
  expected_loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels).long())
  assert result['loss'] == pytest.approx(expected_loss.item(), abs=1e-5)

  # export (in process: the same main() as python -m) gives back the same state dict.
  assert interop.main(['interop', 'export', str(workdir), str(tmp_path / 'out.pt')]) == 0
  assert 'exported the checkpoint at step 0' in capsys.readouterr().out
  assert_state_dicts_equal(torch.load(tmp_path / 'out.pt', weights_only=True), state_dict)


def test_cli_errors(tmp_path, capsys):
  torch.save(torch_reference.googlenet(1, 7).state_dict(), tmp_path / 'c7.pt')
  torch.save(torch_reference.googlenet(3, 10).state_dict(), tmp_path / 'rgb.pt')
  cases = [
      (['import', str(tmp_path / 'c7.pt'), '--workdir', str(tmp_path / 'a')], 'into 7 classes'),
      (['import', str(tmp_path / 'rgb.pt'), '--workdir', str(tmp_path / 'b')],
       '3-channel images'),
      (['import', str(tmp_path / 'c7.pt')], 'needs --workdir'),
      (['import', str(tmp_path / 'c7.pt'), '--workdir', 'x', '--config.bogus=1'],
       'unknown config key --config.bogus'),
      (['import', str(tmp_path / 'c7.pt'), '--workdir', 'x', '--config', 'nothere.py'],
       'nothere.py: no such file'),
      (['export', str(tmp_path / 'empty'), str(tmp_path / 'out.pt')], 'no checkpoints'),
      (['frobnicate'], 'unexpected arguments'),
      (['import', str(tmp_path / 'c7.pt'), '--workdir', str(tmp_path / 'c'),
        '--config', 'configs/image_folder.py', '--config.data_dir=x'],
       "importing into a 'image_folder' run is not supported"),
  ]
  for argv, message in cases:
    assert interop.main(['interop', *argv]) == 2, argv
    assert message in capsys.readouterr().err, argv
  assert not any((tmp_path / d).exists() for d in 'abc')
  assert interop.main(['interop', '--help']) == 0
  assert 'python -m gnet_jax.interop export DIR OUT.pt' in capsys.readouterr().out


def test_import_takes_the_workdir_lock(tmp_path, capsys):
  """A workdir a run is training in is refused: import would write a checkpoint into it."""
  import socket

  from gnet_jax import workdir as workdir_lib
  pt = tmp_path / 'net.pt'
  torch.save(torch_reference.googlenet(1, 10).state_dict(), pt)
  run = tmp_path / 'run'
  with workdir_lib.hold(run):
    code = interop.main(['interop', 'import', str(pt), '--workdir', str(run)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f'error: --workdir {run} is in use by pid {os.getpid()} on host '
                          f'{socket.gethostname()}'), err
    assert not (run / 'checkpoints').exists()

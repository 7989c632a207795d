"""torchvision's GoogLeNet through the commands: import, predict like torchvision, export back.

One random-weight torchvision GoogLeNet (``transform_input=True``, as the
ImageNet weights are used) is saved with ``torch.save`` and imported once;
predict runs on matplotlib's ``grace_hopper.jpg`` (one 224x224 compile for
the module) and must print torchvision's own top-5; the exported file must load
into ``torchvision.models.googlenet`` and give torchvision's logits. Bad input
is one ``error:`` line each, exit 2, and nothing written.
"""

import contextlib
import io
import os
import re

import numpy as np
import pytest

torch = pytest.importorskip('torch')

from PIL import Image  # noqa: E402

from gnet_jax import (image_folder, inception_v1, input_pipeline, interop, predict,  # noqa: E402
                      state as state_lib, torch_reference)
from test_inception_v1 import randomized_googlenet  # noqa: E402

tv = torch_reference.torchvision_models()  # also imports torchvision.transforms
from torchvision import transforms  # noqa: E402  (loaded above, without its C extension)


def photo() -> str:
  from matplotlib import cbook
  return str(cbook.get_sample_data('grace_hopper.jpg', asfileobj=False))


@pytest.fixture(scope='module')
def net():
  net = randomized_googlenet(aux_logits=True, seed=1)
  net.transform_input = True  # what googlenet(weights=IMAGENET1K_V1) sets
  return net.eval()


@pytest.fixture(scope='module')
def pth(net, tmp_path_factory):
  path = tmp_path_factory.mktemp('weights') / 'googlenet-1378be20.pth'
  torch.save(net.state_dict(), path)
  return path


@pytest.fixture(scope='module')
def imported(pth, tmp_path_factory):
  """``interop import FILE --workdir W`` with no --config: configs/finetune.py's run."""
  workdir = tmp_path_factory.mktemp('imported') / 'run'
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert interop.main(['interop', 'import', str(pth), '--workdir', str(workdir)]) == 0
  return workdir, out.getvalue()


def torchvision_input(path: str) -> torch.Tensor:
  """The image as ``GoogLeNet_Weights.IMAGENET1K_V1.transforms()`` prepares it, batch of one."""
  preset = tv.GoogLeNet_Weights.IMAGENET1K_V1.transforms()
  return preset(Image.open(path).convert('RGB'))[None]


# ----------------------------------------------------------------------------- import


def test_import_writes_an_imagenet_inception_v1_run(net, imported):
  workdir, stdout = imported
  assert "torchvision's GoogLeNet, 1000 classes: imagenet" in stdout
  assert 'left out the aux heads' in stdout  # finetune.py trains none
  assert 'transform_input=False' not in stdout  # finetune.py sets it, as the weights need
  assert f'python -m gnet_jax.predict --workdir {workdir}' in stdout
  state, config, step, spec = state_lib.load_checkpoint(workdir)
  assert step == 0
  assert (config.model, config.image_size, config.transform_input) == ('inception_v1', 224, True)
  assert (config.normalize, config.normalize_stats) == (True, 'imagenet')
  assert spec.name == 'imagenet' and spec.image_shape == (224, 224, 3)
  assert spec.class_names == inception_v1.imagenet_classes() and spec.num_classes == 1000
  assert spec.normalization == (inception_v1.IMAGENET_MEAN, inception_v1.IMAGENET_STD)
  assert spec.resize_to == 256
  # Every parameter and running statistic is the file's, bit for bit; no aux heads.
  want = inception_v1.variables_from_torchvision(
      {k: v for k, v in net.state_dict().items() if not k.startswith('aux')})
  got = {'params': state.params, 'batch_stats': state.batch_stats}
  flat_want = dict(zip(*reversed(_flat(want))))
  flat_got = dict(zip(*reversed(_flat(got))))
  assert flat_got.keys() == flat_want.keys()
  for key in flat_want:
    np.testing.assert_array_equal(flat_got[key], flat_want[key], err_msg=key)


def test_imported_workdir_starts_a_fine_tuning_run(net, imported):
  """The import's printed fine-tune command: --config.init_from=W takes W's weights."""
  from gnet_jax import config as config_lib, finetune
  workdir, stdout = imported
  assert f'--config.init_from={workdir}' in stdout
  config = config_lib.default_config()
  config.model = 'inception_v1'
  taken = finetune.load_variables(config, workdir)
  want = inception_v1.variables_from_torchvision(
      {k: v for k, v in net.state_dict().items() if not k.startswith('aux')})
  flat_taken, flat_want = (dict(zip(*reversed(_flat(t)))) for t in (taken, want))
  assert flat_taken.keys() == flat_want.keys()
  for key in flat_want:
    np.testing.assert_array_equal(flat_taken[key], flat_want[key], err_msg=key)


def _flat(tree):
  import jax
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [v for _, v in leaves], [jax.tree_util.keystr(p) for p, _ in leaves]


def test_spec_resize_to_is_saved_and_absent_means_none():
  spec = interop.torchvision_spec(1000)
  assert input_pipeline.DatasetSpec.from_json(spec.to_json()) == spec
  older = {k: v for k, v in spec.to_json().items() if k != 'resize_to'}
  assert input_pipeline.DatasetSpec.from_json(older).resize_to is None
  numbered = interop.torchvision_spec(7, image_size=112)
  assert numbered.class_names == tuple('0123456') and numbered.image_shape == (112, 112, 3)
  assert numbered.resize_to == 128 and numbered.normalization == spec.normalization


# ----------------------------------------------------------------------------- predict


def test_reader_is_torchvisions_imagenet_preprocessing():
  """resize 256 + centre crop 224, against torchvision's transforms on a real photo."""
  path = photo()
  ours = image_folder.load_rgb(path, 224, resize_to=256)
  assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
  pil = Image.open(path).convert('RGB')
  # On a PIL image torchvision's Resize is Pillow's bilinear resize: the same pixels.
  theirs = np.asarray(transforms.CenterCrop(224)(transforms.Resize(256)(pil)))
  np.testing.assert_array_equal(ours, theirs)
  # On a float tensor it is torch's antialiased bilinear: within a grey level (measured:
  # mean 0.29/255, max 1.0/255; ours is rounded to uint8, theirs is not).
  tensor = transforms.PILToTensor()(pil).float() / 255
  crop = transforms.CenterCrop(224)(transforms.Resize(256, antialias=True)(tensor))
  diff = np.abs(crop.permute(1, 2, 0).numpy() - ours / 255.0)
  assert diff.mean() < 0.5 / 255 and diff.max() < 1.5 / 255, (diff.mean() * 255, diff.max() * 255)
  # And the whole preset (ToTensor, Normalize) matches ours after normalising.
  mean, std = (np.asarray(v) for v in (inception_v1.IMAGENET_MEAN, inception_v1.IMAGENET_STD))
  np.testing.assert_allclose(torchvision_input(path)[0].permute(1, 2, 0).numpy(),
                             (ours / 255.0 - mean) / std, atol=1e-6)


@pytest.fixture
def float32_matmuls():
  """No TF32/bf16 passes on an accelerator: the comparisons with torch are at float32."""
  import jax
  with jax.default_matmul_precision('float32'):
    yield


def test_predict_prints_torchvisions_top5(net, imported, capsys, float32_matmuls):
  workdir, _ = imported
  path = photo()
  assert predict.main(['--workdir', str(workdir), path]) == 0
  out = capsys.readouterr().out
  rows = re.findall(r'^\s+(\d)\. (.+?)\s+\(class (\d+)\)\s+([\d.]+)%$', out, re.M)
  assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5], out
  with torch.no_grad():
    probs = torch.softmax(net(torchvision_input(path)), -1)[0].double().numpy()
  order = np.argsort(-probs, kind='stable')[:6]
  names = inception_v1.imagenet_classes()
  assert probs[order[0]] > 5 * probs[order[5]]  # a real ranking, not a flat random one
  results = predict.predict_images(workdir, [path])  # the same numbers, unrounded
  for rank, (row, top) in enumerate(zip(rows, results[0]['top'])):
    cls = int(row[2])
    assert top['class'] == cls and row[1] == names[cls] == top['name']
    assert abs(top['probability'] - probs[cls]) <= 1e-4
    assert abs(float(row[3]) / 100 - probs[cls]) <= 1e-4 + 5e-5  # printed to 0.01%
    if cls != order[rank]:  # another class only where torchvision's two tie
      assert abs(probs[cls] - probs[order[rank]]) <= 1e-6, (rank, cls, order[rank])


def test_top_k_depends_on_the_class_count():
  assert [predict.top_k(n) for n in (2, 10, 99, 100, 1000)] == [3, 3, 3, 5, 5]


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize('aux', [False, True])
def test_export_loads_into_torchvision_with_identical_logits(net, pth, imported, tmp_path, aux,
                                                             capsys):
  workdir, out = imported[0], tmp_path / 'out.pth'
  if aux:  # a run that trains aux heads keeps the file's
    workdir = tmp_path / 'run'
    assert interop.main(['interop', 'import', str(pth), '--workdir', str(workdir),
                         '--config.aux_weight=0.3', '--config.transform_input=False']) == 0
    assert 'note: --config.transform_input=False' in capsys.readouterr().out
  assert interop.main(['interop', 'export', '--workdir', str(workdir), '--out', str(out)]) == 0
  assert f"torchvision's GoogLeNet, 1000 classes{', with aux heads' if aux else ''})" in \
      capsys.readouterr().out
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []  # no temp file
  umask = os.umask(0)
  os.umask(umask)
  assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not 0600
  back = tv.googlenet(num_classes=1000, aux_logits=aux, init_weights=False, transform_input=True)
  # (the exported file holds weights only: transform_input is the loader's, as for torchvision)
  back.load_state_dict(torch.load(out, weights_only=True), strict=True)
  original = net.state_dict()
  for key, value in back.state_dict().items():
    if not key.endswith('num_batches_tracked'):
      assert torch.equal(value, original[key]), key
  x = torchvision_input(photo())
  with torch.no_grad():
    assert torch.equal(back.eval()(x), net(x))


# ----------------------------------------------------------------------------- bad input


def run_main(capsys, *argv: str) -> tuple[int, str]:
  code = interop.main(['interop', *argv])
  return code, capsys.readouterr().err


def test_bad_input_is_one_error_line_and_writes_nothing(net, tmp_path, capsys):
  sd = net.state_dict()
  other = dict(sd)
  other['inception4b.branch9.conv.weight'] = other.pop('inception4b.branch1.conv.weight')
  files = {
      'other_arch.pth': ({k.replace('.conv.', '.'): v for k, v in
                          tv.resnet18(weights=None).state_dict().items()},
                         r"neither the d2l GoogLeNet .* its first keys are 'conv1\.weight'"),
      'renamed.pth': (other, r"renamed\.pth: not torchvision's GoogLeNet: missing state dict "
                             r"keys 'inception4b\.branch1\.conv\.weight' \(160, 512, 1, 1\); "
                             r"unexpected state dict keys 'inception4b\.branch9\.conv\.weight'"),
      'list.pth': ([1, 2, 3], 'holds a list, not a state dict'),
      'model.pth': (net, 'holds pickled Python objects'),
  }
  for name, (obj, _) in files.items():
    torch.save(obj, tmp_path / name)
  (tmp_path / 'notes.pth').write_text('just some text\n')
  files['notes.pth'] = (None, 'not a PyTorch file torch.load can read')
  files['missing.pth'] = (None, 'no such file')
  for name, (_, message) in files.items():
    workdir = tmp_path / f'run_{name}'
    code, err = run_main(capsys, 'import', str(tmp_path / name), '--workdir', str(workdir))
    assert code == 2, (name, err)
    assert err.count('\n') == 1 and err.startswith('error: '), (name, err)
    assert re.search(message, err), (name, err)
    assert not workdir.exists(), name


def test_numbered_classes_need_data_with_finetune_config(tmp_path, capsys):
  net = tv.googlenet(weights=None, num_classes=7, aux_logits=False, init_weights=True)
  torch.save(net.state_dict(), tmp_path / 'seven.pth')
  code, err = run_main(capsys, 'import', str(tmp_path / 'seven.pth'), '--workdir',
                       str(tmp_path / 'run'))
  assert code == 2 and 'a 7-class torchvision GoogLeNet' in err and '--config.data_dir' in err
  assert not (tmp_path / 'run').exists()


def test_import_into_an_image_folder_run_names_its_classes(tmp_path, capsys, float32_matmuls):
  """With --config.data_dir the folder's class names label the classes, and evaluate runs."""
  from gnet_jax import evaluate
  from image_folders import CLASSES, make_folder
  folder = make_folder(tmp_path / 'photos', {'train': 1, 'test': 2})
  net = randomized_googlenet(aux_logits=False, seed=2)
  net.fc = torch.nn.Linear(1024, len(CLASSES))
  net.transform_input = True
  torch.save(net.state_dict(), tmp_path / 'three.pth')
  assert interop.main(['interop', 'import', str(tmp_path / 'three.pth'), '--workdir',
                       str(tmp_path / 'run'), f'--config.data_dir={folder}',
                       '--config.image_size=64']) == 0
  config, spec = state_lib.read_run(tmp_path / 'run')
  assert (config.dataset, config.model) == ('image_folder', 'inception_v1')
  assert spec.class_names == CLASSES and spec.resize_to is None
  # evaluate scores it as torchvision does on the same (host-decoded) test images.
  result = evaluate.evaluate_checkpoint(tmp_path / 'run')
  images, labels = result['examples']['images'], result['examples']['labels']
  assert result['count'] == 2 * len(CLASSES) == len(images)
  mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (inception_v1.IMAGENET_MEAN,
                                                          inception_v1.IMAGENET_STD))
  x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
  with torch.no_grad():
    logits = net.eval()(x)
  loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels).long()).item()
  assert result['loss'] == pytest.approx(loss, rel=1e-4)
  np.testing.assert_array_equal(result['examples']['predictions'], logits.argmax(1).numpy())
  torch.save(tv.googlenet(weights=None, num_classes=5, aux_logits=False,
                          init_weights=True).state_dict(), tmp_path / 'five.pth')
  code, err = run_main(capsys, 'import', str(tmp_path / 'five.pth'), '--workdir',
                       str(tmp_path / 'run5'), f'--config.data_dir={folder}')
  assert code == 2 and 'into 5 classes, but the image folder' in err
  assert not (tmp_path / 'run5').exists()


def test_export_to_an_unwritable_path_writes_nothing(imported, tmp_path, capsys):
  workdir, _ = imported
  (tmp_path / 'a_file').write_text('x')
  cases = [tmp_path / 'no_such_folder' / 'out.pth', tmp_path / 'a_file' / 'out.pth', tmp_path]
  if os.geteuid() != 0:  # root writes anywhere
    locked = tmp_path / 'locked'
    locked.mkdir(mode=0o500)
    cases.append(locked / 'out.pth')
  before = sorted(p.name for p in tmp_path.rglob('*'))
  for out in cases:
    code, err = run_main(capsys, 'export', '--workdir', str(workdir), '--out', str(out))
    assert code == 2 and err.count('\n') == 1 and err.startswith('error: '), (out, err)
    assert str(out) in err, err
  assert sorted(p.name for p in tmp_path.rglob('*')) == before

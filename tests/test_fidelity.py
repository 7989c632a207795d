"""``python -m benchmarks.fidelity``: gnet-jax and the PyTorch original trained side by side, step by step.

A tiny run in this process (16 synthetic images at 32x32, batch 8, 4 steps =
2 epochs): one GoogLeNet compilation. The full-size measurement is in
docs/fidelity.md.
"""

import json

import matplotlib.colors
import pytest

torch = pytest.importorskip('torch')

from benchmarks import fidelity  # noqa: E402
from conftest import pixels_of_color, read_png  # noqa: E402

STEPS = 4
TINY = ['--image_size', '32', '--config.batch_size=8', '--train_examples', '16',
        '--eval_examples', '8', '--log_every', '1']


@pytest.fixture(scope='module')
def tiny_run(idx_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp('fidelity')
  threads = torch.get_num_threads()
  try:
    rc = fidelity.main(TINY + ['--steps', str(STEPS), '--data_dir', str(idx_dir),
                               '--out', str(out)])
  finally:
    torch.set_num_threads(threads)
  return rc, out


def test_losses_agree_step_by_step(tiny_run, capsys):
  rc, out = tiny_run
  assert rc == 0
  result = json.loads((out / 'fidelity.json').read_text())
  assert result['steps'] == list(range(1, STEPS + 1))
  jax_loss, torch_loss = result['jax_loss'], result['torch_loss']
  assert all(2.0 < loss < 2.6 for loss in torch_loss)  # a real (untrained, 10-class) loss
  for step, a, b in zip(result['steps'], jax_loss, torch_loss):
    assert abs(a - b) <= 1e-4 * abs(b), f'step {step}: gnet-jax {a}, PyTorch {b}'
  assert result['first_step_rel_diff_exceeds']['0.0001'] is None
  # The parameters moved, and stayed together.
  assert all(p['param_rel_diff'] < 1e-5 for p in result['param_rel_diff'])
  # 16 examples, batch 8: two epochs of two steps, each ending with both evaluations.
  assert [e['epoch'] for e in result['evals']] == [1, 2]
  for e in result['evals']:
    assert e['jax']['count'] == e['torch']['count'] == 8
    assert e['jax']['loss'] == pytest.approx(e['torch']['loss'], rel=1e-4)


def test_plot_is_written(tiny_run, tmp_path):
  _, out = tiny_run
  pixels = read_png(out / 'fidelity.png')
  assert pixels.shape == (770, 990, 3)  # 9 x 7 in at 110 dpi
  # Both loss curves and the relative difference reached the file (a legend line: < 100).
  orange_on_white = tuple(0.7 * c + 0.3 for c in matplotlib.colors.to_rgb('tab:orange'))
  for color in ('tab:blue', orange_on_white, 'tab:red'):  # PyTorch's curve has alpha 0.7
    assert pixels_of_color(pixels, color) > 200, color
  # The curves are the recorded losses (redrawn from fidelity.json, as --replot does).
  result = json.loads((out / 'fidelity.json').read_text())
  fig = fidelity.plot(result, tmp_path / 'again.png')
  losses = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines()}
  assert losses['gnet-jax'] == result['jax_loss']
  assert losses['PyTorch original'] == result['torch_loss']
  assert list(fig.axes[0].get_lines()[0].get_xdata()) == result['steps']


@pytest.mark.parametrize('extra, message', [
    (['--config.aux_weight=0.3'], 'aux_weight=0.3'),
    (['--config.augment_flip=true'], 'augmentation'),
    (['--config.no_such_key=1'], 'no_such_key'),
    (['--config', 'configs/missing.py'], 'configs/missing.py'),
    (['--config.optimizer=rmsprop'], "optimizer must be one of 'sgd', 'adam'"),
])
def test_bad_input_is_one_error_line(extra, message, tmp_path, capsys):
  assert fidelity.main(TINY + ['--steps', '1', '--out', str(tmp_path)] + extra) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith('error: ') and message in err[-1]
  assert not (tmp_path / 'fidelity.json').exists()


def test_missing_data_is_one_error_line(tmp_path, capsys):
  rc = fidelity.main(TINY + ['--steps', '1', '--out', str(tmp_path / 'out'),
                             '--data_dir', str(tmp_path / 'nowhere')])
  assert rc == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith('error: ') and 'nowhere' in err[-1]

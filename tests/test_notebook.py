"""notebooks/colab_tpu.ipynb runs top to bottom on a CPU, as CI runs it.

The notebook reads ``GNET_NOTEBOOK_SMOKE=1`` (skip pip install, tiny config, two
virtual CPU devices), ``GNET_NOTEBOOK_DATA_DIR`` and ``GNET_NOTEBOOK_WORKDIR``
in its parameters cell; every other cell runs as it would in Colab.
"""

import json
import sys

import nbformat
from nbclient import NotebookClient

from conftest import REPO, write_idx_dataset
from image_folders import make_folder

NOTEBOOK = REPO / 'notebooks' / 'colab_tpu.ipynb'


def test_notebook_is_committed_valid_and_clean():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(not c.outputs and c.execution_count is None for c in code), 'clear the outputs'
  params = [c for c in code if 'parameters' in c.metadata.get('tags', [])]
  assert len(params) == 1 and 'REPO_URL' in params[0].source
  assert 'colab_tpu' not in ''.join(c.source for c in code)  # no jax.tools.colab_tpu


def test_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
  data_dir = write_idx_dataset(tmp_path / 'idx', n_train=64, n_test=32)
  workdir = tmp_path / 'run'
  monkeypatch.setenv('GNET_NOTEBOOK_SMOKE', '1')
  monkeypatch.setenv('GNET_NOTEBOOK_DATA_DIR', str(data_dir))
  monkeypatch.setenv('GNET_NOTEBOOK_WORKDIR', str(workdir))
  own = make_folder(tmp_path / 'own', {'train': 2, 'test': 1})
  monkeypatch.setenv('GNET_NOTEBOOK_OWN_IMAGES', str(own))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # The kernel inherits this process's environment; nbclient raises CellExecutionError,
  # naming the cell, if any cell fails.
  NotebookClient(nb, kernel_name='python3', timeout=300,
                 resources={'metadata': {'path': str(REPO)}}).execute()

  text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                   for o in c.outputs if o.output_type == 'stream')
  assert 'runtime: cpu' in text
  assert f'python {sys.executable}' in text  # the kernel is this venv's python
  assert 'backend cpu, 2 device(s)' in text
  # train.py --summary: the stage table at 28x28 (b4's 2x2 maps pooled to 1x1), parameters
  # and FLOPs.
  for part in ('b1', 'b5', 'head', '5,977,530', 'float32[1,1,1,832]', 'flops'):
    assert part in text, part
  assert 'sharded on 2 x cpu' in text  # data-parallel across both devices
  assert 'epoch 1/1: loss' in text
  assert 'test accuracy' in text and 'over 32 examples' in text
  assert f'TensorBoard: tensorboard --logdir {workdir / "tensorboard"}' in text  # not Colab
  assert f'saved {workdir / "predictions.png"}' in text
  # predict on three test images, the third saved dark-on-light and inverted back
  samples = sorted((workdir / 'samples').glob('*.png'))
  assert [p.name for p in samples] == ['test_0.png', 'test_1.png', 'test_2_dark_on_light.png']
  assert '-m gnet_jax.predict --workdir' in text
  assert text.count('(inverted: dark on light)') == 1
  images = [o for c in nb.cells for o in c.get('outputs', [])
            if 'image/png' in o.get('data', {})]
  # curves.png, the matplotlib plot, confusion.png, predictions.png, the three samples
  assert len(images) == 5
  # The own-images cell: configs/image_folder.py on the generated folder, then predict.
  assert f'data: image folder {own} (decoded' in text
  own_run = tmp_path / 'run_own_images'
  (row,) = [json.loads(r) for r in (own_run / 'metrics.jsonl').read_text().splitlines()]
  assert row['epoch'] == 1
  assert 'is a circle; the model says:' in text
  assert sum(line.startswith('  1. ') for line in text.splitlines()) == 4  # 3 samples + 1
  (line,) = (workdir / 'metrics.jsonl').read_text().splitlines()
  assert json.loads(line)['epoch'] == 1
  assert (workdir / 'confusion.png').is_file()

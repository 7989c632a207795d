"""``.pt`` files: what a bad file is told, and writes that never leave half a file."""

import os

import numpy as np
import pytest

from gnet_jax import torch_files
from gnet_jax.errors import InputError, StateDictError

torch = pytest.importorskip('torch')


def test_unreadable_files_are_named_by_their_source(tmp_path):
  (tmp_path / 'junk.pt').write_bytes(b'not a torch file at all')
  with pytest.raises(StateDictError, match=f'^{tmp_path}/junk.pt: not a PyTorch file'):
    torch_files.read_state_dict(tmp_path / 'junk.pt')
  with pytest.raises(StateDictError, match='^--flag=x.pt: no such file'):
    torch_files.read_state_dict(tmp_path / 'missing.pt', source='--flag=x.pt')
  torch.save({'epoch': 3}, tmp_path / 'no_weights.pt')
  with pytest.raises(StateDictError, match="without a state dict: its keys are 'epoch'"):
    torch_files.read_state_dict(tmp_path / 'no_weights.pt')
  torch.save([1, 2], tmp_path / 'list.pt')
  with pytest.raises(StateDictError, match='^--flag=x.pt holds a list, not a state dict'):
    torch_files.read_state_dict(tmp_path / 'list.pt', source='--flag=x.pt')


def test_a_checkpoint_dicts_weights_are_found_and_a_prefix_stripped_only_from_every_key(
    tmp_path):
  weights = {'module.fc.weight': torch.ones(2, 3), 'module.fc.bias': torch.zeros(2)}
  torch.save({'epoch': 3, 'model_state_dict': weights}, tmp_path / 'checkpoint.pt')
  read = torch_files.read_state_dict(tmp_path / 'checkpoint.pt')
  assert list(read) == list(weights)
  stripped, removed = torch_files.strip_prefix(read, 'module.')
  assert removed and list(stripped) == ['fc.weight', 'fc.bias']
  mixed = {**weights, 'other.weight': torch.ones(1)}
  assert torch_files.strip_prefix(mixed, 'module.') == (mixed, False)


def test_a_failed_write_leaves_nothing_half_written(tmp_path):
  first, second = tmp_path / 'model.jax', tmp_path / 'gone' / 'model.jax.json'
  (tmp_path / 'old.onnx').write_bytes(b'old')
  with pytest.raises(InputError, match='cannot write'):
    torch_files.write_whole({first: b'x' * 1000, second: b'{}'})
  assert sorted(os.listdir(tmp_path)) == ['old.onnx']  # no file, no temporary
  torch_files.write_whole({tmp_path / 'old.onnx': b'new'})
  assert (tmp_path / 'old.onnx').read_bytes() == b'new'
  assert sorted(os.listdir(tmp_path)) == ['old.onnx']


def test_a_full_disk_leaves_no_file(tmp_path, monkeypatch):
  """A state dict's write cut short leaves neither the file nor its temporary."""
  open_fd = os.fdopen

  class FullDisk:
    def __init__(self, fd, mode):
      self.file = open_fd(fd, mode)

    def __enter__(self):
      return self

    def __exit__(self, *_):
      self.file.close()

    def write(self, data):
      self.file.write(data[:len(data) // 2])
      raise OSError(28, 'No space left on device')

  out = tmp_path / 'out.pth'
  monkeypatch.setattr(os, 'fdopen', FullDisk)
  with pytest.raises(InputError, match=f'cannot write {out} .No space left on device'):
    torch_files.save_state_dict({'w': np.zeros(3, np.float32)}, out)
  assert list(tmp_path.iterdir()) == []


def test_a_saved_state_dict_loads_with_weights_only(tmp_path):
  torch_files.save_state_dict({'w': np.arange(3, dtype=np.float32), 'b': torch.ones(2)},
                              tmp_path / 'out.pth')
  loaded = torch.load(tmp_path / 'out.pth', weights_only=True)
  assert list(loaded) == ['w', 'b'] and loaded['w'].tolist() == [0.0, 1.0, 2.0]
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(tmp_path / 'out.pth').st_mode & 0o777 == 0o666 & ~umask  # open()'s, not 0600

"""PyTorch ``.pt``/``.pth`` files: a state dict read safely, one written whole.

Shared by the d2l import (``interop``), fine-tuning from torchvision weights
(``finetune``) and the exports. torch is imported only when a file is read or
written, so the rest of gnet-jax runs without it.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from gnet_jax.errors import DependencyError, InputError, StateDictError

# Keys under which training scripts commonly wrap a state dict (or a model) in a checkpoint dict.
WRAPPER_KEYS = ('state_dict', 'model_state_dict', 'model')


def import_torch():
  """``torch``, or a ``DependencyError`` that says how to install it."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DependencyError(
        'PyTorch is needed to read or write .pt files: pip install "gnet-jax[interop]" '
        '(on a machine without a GPU, first install the CPU build: pip install torch '
        '--index-url https://download.pytorch.org/whl/cpu)') from None
  return torch


def first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__


def _is_state_dict(obj: Any) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(
      isinstance(k, str) and hasattr(v, 'shape') for k, v in obj.items())


def extract_state_dict(obj: Any, source: str = 'the file') -> Mapping[str, Any]:
  """The state dict inside what ``torch.load`` returned.

  Accepted: a state dict; an ``nn.Module`` (its ``state_dict()``); or a dict
  holding either under ``'state_dict'``, ``'model_state_dict'`` or ``'model'``
  (other entries, such as optimizer state or the epoch, are ignored).
  """
  if not isinstance(obj, Mapping) and callable(getattr(obj, 'state_dict', None)):
    return obj.state_dict()
  if _is_state_dict(obj):
    return obj
  if isinstance(obj, Mapping):
    for key in WRAPPER_KEYS:
      if key in obj:
        return extract_state_dict(obj[key], f'{source}[{key!r}]')
    raise StateDictError(
        f'{source} is a dict without a state dict: its keys are '
        f'{", ".join(repr(k) for k in list(obj)[:8])}; expected parameter tensors, or a '
        f'state dict under one of {", ".join(repr(k) for k in WRAPPER_KEYS)}')
  raise StateDictError(f'{source} holds a {type(obj).__name__}, not a state dict or a model')


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> tuple[dict[str, Any], bool]:
  """``state_dict`` without ``prefix`` (e.g. ``DataParallel``'s ``module.``) when every key has
  it, and whether it was removed."""
  if state_dict and all(k.startswith(prefix) for k in state_dict):
    return {k[len(prefix):]: v for k, v in state_dict.items()}, True
  return dict(state_dict), False


def read_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False,
                    source: str | None = None) -> Mapping[str, Any]:
  """The state dict in a ``.pt``/``.pth`` file (see ``extract_state_dict``), keys as saved.

  Uses ``torch.load(weights_only=True)``, which only rebuilds tensors and plain
  containers. A whole pickled ``nn.Module`` needs full unpickling, which can run
  arbitrary code from the file: that happens only with ``trust_pickle=True``.
  ``source`` names the file in errors (default: its path), e.g. the flag that gave it.
  """
  torch = import_torch()
  path = os.fspath(path)
  name = source or path
  if not os.path.isfile(path):
    raise StateDictError(f'{name}: no such file')
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    # The safe loader names the class it refused ("Unsupported global" since torch 2.4,
    # "Unsupported class" before); any other failure means the file is not a torch file.
    if 'Unsupported global' not in str(e) and 'Unsupported class' not in str(e):
      raise StateDictError(f'{name}: not a PyTorch file torch.load can read ({first_line(e)})'
                           ) from None
    if not trust_pickle:
      raise StateDictError(
          f'{name} holds pickled Python objects (such as a whole model saved with '
          'torch.save(model)), not just tensors. Unpickling it can run arbitrary code from the '
          'file. Either re-save the weights alone, torch.save(model.state_dict(), PATH), or, if '
          f'you trust the file, convert it with python -m gnet_jax.interop import {path} '
          '--workdir DIR --trust_pickle (the classes it was saved with, e.g. Inception, must '
          'then be importable)') from None
    try:
      obj = torch.load(path, map_location='cpu', weights_only=False)
    except (AttributeError, ModuleNotFoundError, ImportError) as e2:
      raise StateDictError(
          f'{name} is a pickled model whose classes cannot be found ({first_line(e2)}); '
          'load it where they are defined and save model.state_dict() instead') from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e2:
      raise StateDictError(f'{name}: torch.load cannot read it ({first_line(e2)})') from None
  except Exception as e:  # pylint: disable=broad-except  (on a text file the unpickler raises
    # KeyError; other bytes give RuntimeError, EOFError, ValueError, IndexError, ...)
    reason = (first_line(e) if isinstance(e, (RuntimeError, OSError, ValueError))
              else f'{type(e).__name__} while unpickling')
    raise StateDictError(f'{name}: not a PyTorch file torch.load can read ({reason})') from None
  return extract_state_dict(obj, name)


def check_writable(path: str | os.PathLike, example: str = 'model.pth') -> Path:
  """``path`` if a file can be written there (its folder exists and is writable), else
  ``InputError``: checked before any work, so a bad ``--out`` costs nothing. ``example``:
  the file name the message suggests when ``path`` is a folder."""
  path = Path(path)
  if path.is_dir():
    raise InputError(f'{path} is a folder; give the file to write, e.g. {path / example}')
  folder = path.parent
  if not folder.is_dir():
    raise InputError(f'cannot write {path}: {folder} is not a folder; create it or choose '
                     'another file')
  if not os.access(folder, os.W_OK | os.X_OK):
    raise InputError(f'cannot write {path}: {folder} is not writable by this user; choose '
                     'another file')
  return path


def write_whole(files: Mapping[Path, bytes]) -> None:
  """Writes each file under a temporary name beside it, then renames them all into place.

  A reader never sees half a file, and a failed write leaves none (an
  ``InputError`` naming the path).
  """
  umask = os.umask(0)  # temporary files are private (0600); the results get open()'s mode
  os.umask(umask)
  written: list[tuple[str, Path]] = []
  path = None
  try:
    for path, data in files.items():
      fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
      written.append((tmp, path))
      with os.fdopen(fd, 'wb') as f:
        f.write(data)
      os.chmod(tmp, 0o666 & ~umask)
    for tmp, path in written:
      os.replace(tmp, path)
  except OSError as e:
    for tmp, _ in written:
      Path(tmp).unlink(missing_ok=True)
    raise InputError(f'cannot write {path} ({e.strerror or first_line(e)}); choose a writable '
                     'file in an existing folder') from None


def save_state_dict(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
  """``torch.save`` of a state dict (NumPy or torch values), loadable with ``weights_only=True``,
  written whole (``write_whole``)."""
  torch = import_torch()
  tensors = collections.OrderedDict(
      (k, v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v)))
      for k, v in state_dict.items())
  path = check_writable(path)
  buffer = io.BytesIO()
  torch.save(tensors, buffer)
  write_whole({path: buffer.getvalue()})

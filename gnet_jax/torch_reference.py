"""The d2l GoogLeNet in PyTorch: the reference that ``gnet_jax`` must match.

Written for the tests (and the benchmark) from the architecture of *Dive into
Deep Learning*, section 8.4: an ``nn.Sequential(b1, b2, b3, b4, b5,
nn.Linear(1024, num_classes))`` whose Inception modules name their convs
``p1_1``, ``p2_1``, ``p2_2``, ``p3_1``, ``p3_2``, ``p4_2``. Its ``state_dict``
keys are therefore exactly those of a model trained with the book's code.
Part of the package so that tests, benchmarks and users import it from one place
(``from gnet_jax import torch_reference``); it needs PyTorch, and of ``gnet_jax``
only ``export`` imports it (inside its functions), for the ONNX export.

``torchvision_models`` loads torchvision's own model code (its GoogLeNet, the
reference for ``gnet_jax.inception_v1``) even where ``import torchvision`` fails.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import torch
from torch import nn
from torch.nn import functional as F


class Inception(nn.Module):
  """Four parallel branches (1x1; 1x1->3x3; 1x1->5x5; 3x3 max-pool->1x1), concatenated."""

  def __init__(self, in_channels: int, c1: int, c2: tuple[int, int], c3: tuple[int, int],
               c4: int):
    super().__init__()
    self.p1_1 = nn.Conv2d(in_channels, c1, kernel_size=1)
    self.p2_1 = nn.Conv2d(in_channels, c2[0], kernel_size=1)
    self.p2_2 = nn.Conv2d(c2[0], c2[1], kernel_size=3, padding=1)
    self.p3_1 = nn.Conv2d(in_channels, c3[0], kernel_size=1)
    self.p3_2 = nn.Conv2d(c3[0], c3[1], kernel_size=5, padding=2)
    self.p4_1 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
    self.p4_2 = nn.Conv2d(in_channels, c4, kernel_size=1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    p1 = F.relu(self.p1_1(x))
    p2 = F.relu(self.p2_2(F.relu(self.p2_1(x))))
    p3 = F.relu(self.p3_2(F.relu(self.p3_1(x))))
    p4 = F.relu(self.p4_2(self.p4_1(x)))
    return torch.cat((p1, p2, p3, p4), dim=1)


def googlenet(in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
  """The book's network, Xavier-uniform initialised as its training code does.

  Biases keep PyTorch's default (uniform) init, so they are nonzero: a copy
  that dropped or misplaced a bias would show up in the comparisons.
  """
  b1 = nn.Sequential(nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3),
                     nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
  b2 = nn.Sequential(nn.Conv2d(64, 64, kernel_size=1), nn.ReLU(),
                     nn.Conv2d(64, 192, kernel_size=3, padding=1), nn.ReLU(),
                     nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
  b3 = nn.Sequential(Inception(192, 64, (96, 128), (16, 32), 32),
                     Inception(256, 128, (128, 192), (32, 96), 64),
                     nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
  b4 = nn.Sequential(Inception(480, 192, (96, 208), (16, 48), 64),
                     Inception(512, 160, (112, 224), (24, 64), 64),
                     Inception(512, 128, (128, 256), (24, 64), 64),
                     Inception(512, 112, (144, 288), (32, 64), 64),
                     Inception(528, 256, (160, 320), (32, 128), 128),
                     nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
  b5 = nn.Sequential(Inception(832, 256, (160, 320), (32, 128), 128),
                     Inception(832, 384, (192, 384), (48, 128), 128),
                     nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())
  net = nn.Sequential(b1, b2, b3, b4, b5, nn.Linear(1024, num_classes))
  for m in net.modules():
    if isinstance(m, (nn.Conv2d, nn.Linear)):
      nn.init.xavier_uniform_(m.weight)
  return net


class Standardize(nn.Module):
  """``(x - mean) / std`` per channel of an NCHW batch: a run's normalisation as a layer.

  What ``gnet_jax.export`` puts in front of a network so an exported model
  takes pixels in [0, 1]; torchvision's ``Normalize`` would not do, as it checks
  its values at run time, which ``torch.export`` cannot trace.
  """

  def __init__(self, mean, std):
    super().__init__()
    self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
    self.register_buffer('std', torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return (x - self.mean) / self.std


def shape_table(net: nn.Sequential, in_channels: int = 1,
                size: int = 96) -> list[tuple[str, tuple]]:
  """Each stage's output shape for a ``1 x in_channels x size x size`` input (NCHW).

  The book's printout: ``for layer in net: X = layer(X); print(name, 'output shape:', X.shape)``.
  """
  x = torch.zeros((1, in_channels, size, size))
  rows = []
  with torch.no_grad():
    for layer in net:
      x = layer(x)
      rows.append((layer.__class__.__name__, tuple(x.shape)))
  return rows


def print_shape_table(net: nn.Sequential, in_channels: int = 1, size: int = 96) -> None:
  for name, shape in shape_table(net, in_channels, size):
    print(f'{name} output shape:\t{shape}')


def torchvision_models() -> types.ModuleType:
  """``torchvision.models``, loaded without torchvision's C extension.

  The registry's ``torchvision==0.28.0`` (the match for ``torch==2.13.0``) is a
  CUDA build: ``import torchvision`` fails beside a CPU torch (``operator
  torchvision::nms does not exist``), because its package ``__init__`` loads the
  extension. Its model and transform code is plain Python that needs none of it,
  so an empty ``torchvision`` package over the installed folder is registered
  first (unless torchvision is imported already) and ``torchvision.models``
  (and ``torchvision.transforms``) import from that. Install it without letting
  pip replace the CPU torch: ``pip install --no-deps torchvision==0.28.0``.
  """
  if 'torchvision' not in sys.modules:
    spec = importlib.util.find_spec('torchvision')
    if spec is None or not spec.submodule_search_locations:
      raise ModuleNotFoundError(
          'torchvision is not installed; beside torch==2.13.0 install its match without '
          'letting pip replace torch: pip install --no-deps torchvision==0.28.0')
    package = types.ModuleType('torchvision')
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules['torchvision'] = package
  import torchvision.models  # pylint: disable=import-outside-toplevel
  import torchvision.transforms  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  return torchvision.models


if __name__ == '__main__':
  print_shape_table(googlenet())

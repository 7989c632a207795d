"""Analytic FLOP count of the d2l GoogLeNet (convolutions and dense layers).

A multiply-add counts as 2 FLOPs; padding positions are counted, as the
layers compute them. Pooling, ReLU and the optimizer update are left out
(well under 1% of the total). A training step is counted as 3x the forward
pass (the backward pass computes two products per layer: input and weight
gradients).
"""

from __future__ import annotations


def _out(size: int, kernel: int, stride: int, pad: int) -> int:
  return (size + 2 * pad - kernel) // stride + 1


def forward_flops(image_size: int, in_channels: int = 1, num_classes: int = 10) -> int:
  """FLOPs of one image's forward pass at ``image_size`` x ``image_size``."""
  # Imported here so that this module can be loaded without JAX.
  from gnet_jax.models import B3_BLOCKS, B4_BLOCKS, B5_BLOCKS

  total = 0

  def conv(hw: int, cin: int, cout: int, k: int, stride: int = 1) -> int:
    nonlocal total
    out = _out(hw, k, stride, k // 2)
    total += 2 * k * k * cin * cout * out * out
    return out

  def pool(hw: int) -> int:  # 3x3, stride 2, padding 1
    return _out(hw, 3, 2, 1)

  hw = pool(conv(image_size, in_channels, 64, 7, stride=2))
  hw = conv(hw, 64, 64, 1)
  hw = pool(conv(hw, 64, 192, 3))
  channels = 192
  for blocks in (B3_BLOCKS, B4_BLOCKS, B5_BLOCKS):
    for c1, (c2r, c2), (c3r, c3), c4 in blocks:
      for cout in (c1, c2r, c3r, c4):
        conv(hw, channels, cout, 1)
      conv(hw, c2r, c2, 3)
      conv(hw, c3r, c3, 5)
      channels = c1 + c2 + c3 + c4
    if blocks is not B5_BLOCKS:
      hw = pool(hw)
  return total + 2 * channels * num_classes


def train_flops(image_size: int, in_channels: int = 1, num_classes: int = 10) -> int:
  """FLOPs of one image's training step (forward + backward), as 3x the forward pass."""
  return 3 * forward_flops(image_size, in_channels, num_classes)

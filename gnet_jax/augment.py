"""Training-time augmentation on the device: random crops and horizontal flips.

Off by default (the book's recipe has none). Runs inside the jitted train step
on the preprocessed float batch. Each example draws from its own key, which
``train.train_step`` derives from (seed, step, index of the example in the
global batch): the augmented batch is the same on one device or eight, and a
resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# torchvision's RandomResizedCrop defaults: the crop covers 8%-100% of the
# image's area, with an aspect ratio between 3/4 and 4/3 (uniform in log).
RESIZED_CROP_SCALE = (0.08, 1.0)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)


def pad_crop(x: jax.Array, key: jax.Array, padding: int) -> jax.Array:
  """One HWC image zero-padded by ``padding`` and cropped back to its size at a random place."""
  h, w, _ = x.shape
  padded = jnp.pad(x, ((padding, padding), (padding, padding), (0, 0)))
  dy, dx = jax.random.randint(key, (2,), 0, 2 * padding + 1)
  return jax.lax.dynamic_slice(padded, (dy, dx, 0), x.shape)


def resized_crop(x: jax.Array, key: jax.Array) -> jax.Array:
  """A random box of one HWC image (area and aspect as ``RESIZED_CROP_*``), resized to HxW."""
  h, w, _ = x.shape
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, (), minval=RESIZED_CROP_SCALE[0], maxval=RESIZED_CROP_SCALE[1])
  log_ratio = jax.random.uniform(k_ratio, (), minval=math.log(RESIZED_CROP_RATIO[0]),
                                 maxval=math.log(RESIZED_CROP_RATIO[1]))
  ratio = jnp.exp(log_ratio)  # box width / height, relative to the image's own aspect
  box_h = jnp.clip(jnp.sqrt(area / ratio), 0.0, 1.0) * h
  box_w = jnp.clip(jnp.sqrt(area * ratio), 0.0, 1.0) * w
  y0 = jax.random.uniform(k_y, ()) * (h - box_h)
  x0 = jax.random.uniform(k_x, ()) * (w - box_w)
  scale = jnp.stack([h / box_h, w / box_w])
  return jax.image.scale_and_translate(x, x.shape, (0, 1), scale, -jnp.stack([y0, x0]) * scale,
                                       method='linear', antialias=True)


def flip(x: jax.Array, key: jax.Array) -> jax.Array:
  """One HWC image mirrored left-right with probability 1/2."""
  return jnp.where(jax.random.bernoulli(key), x[:, ::-1], x)


def augment(images: jax.Array, example_keys: jax.Array, crop: str, flip_images: bool,
            padding: int) -> jax.Array:
  """The batch ``images`` [N, H, W, C] augmented, example ``i`` drawing from ``example_keys[i]``.

  ``crop``: ``'none'``, ``'pad'`` (``pad_crop`` by ``padding``) or ``'resized'``
  (``resized_crop``); allowed values are ``config.RULES``'s.
  """
  def one(x, key):
    k_crop, k_flip = jax.random.split(jax.random.fold_in(key, 0x61756720))  # 'aug '
    if crop == 'pad':
      x = pad_crop(x, k_crop, padding)
    elif crop == 'resized':
      x = resized_crop(x, k_crop)
    return flip(x, k_flip) if flip_images else x

  if crop == 'none' and not flip_images:
    return images
  return jax.vmap(one)(images, example_keys)

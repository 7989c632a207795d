"""Ask a checkpoint about your own images: ``python -m gnet_jax.predict --workdir DIR IMAGE...``.

Restores the newest readable checkpoint in ``DIR/checkpoints`` (or ``--step N``),
rebuilds the model from the config saved with it, and prints the most likely
classes, with their names and softmax probabilities, for each PNG/JPEG file
(``--json``: one JSON document instead): the top five for a run of 100 classes
or more (ImageNet's measure; an imported ImageNet GoogLeNet), the top three
otherwise (``top_k``).

Each file is converted the way the dataset's images look:

- transparent pixels are put on white (a drawing app's black strokes on a
  transparent canvas become dark-on-light, handled by the next step);
- grayscale (Pillow's 'L', 0..255; 16-bit files are scaled by their bit depth,
  65535 -> 255; the file is read by ``image_folder.read_image``, as training's are);
- MNIST and Fashion-MNIST are light-on-dark, so a dark digit on white paper is
  inverted. ``--invert auto`` (default) inverts when the mean of the image's
  border is brighter than mid-grey (127), i.e. the background is light;
  ``--invert yes/no`` overrides that (colour runs read images as they are:
  there ``--invert yes/no`` is refused);
- fitted into 28x28 keeping its aspect ratio (no stretching), the rest padded
  with the background's brightness (the median of the border after
  inversion), so a photo should be cropped roughly around the digit or item.
  A 28x28 image (e.g. a test image saved as PNG) passes through unchanged.

Colour runs read the file in RGB as their image folders are read (the shorter
side scaled to the image size, the centre cropped), or, when the run's spec
says ``resize_to`` (an imported ImageNet network: 256), as torchvision's
ImageNet evaluation does: the shorter side to 256 (bilinear, antialiased),
the centre 224x224 (``image_folder.resize_and_crop``).

The model then sees it exactly as in training and evaluation:
``input_pipeline.preprocess`` scales to [0, 1] and resizes to the run's ``image_size``
on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from gnet_jax.errors import DatasetError, InputError

INVERT_CHOICES = ('auto', 'yes', 'no')
TOP_K = 3
# From this many classes on, the top five are shown (ImageNet's top-5), else ``TOP_K``.
TOP5_FROM_CLASSES = 100
# Images per forward pass: a batch is padded up to a power of two (at most this), so a
# handful of images compiles one small program and many images reuse one larger one.
MAX_BATCH = 32


def _border(pixels: np.ndarray) -> np.ndarray:
  """The outer ring of a 2-D image, as wide as one pixel of the 28x28 result would be."""
  h, w = pixels.shape
  width = max(1, min(h, w) // 28)
  return np.concatenate([pixels[:width].ravel(), pixels[-width:].ravel(),
                         pixels[:, :width].ravel(), pixels[:, -width:].ravel()])


def _check_invert(invert: str) -> None:
  if invert not in INVERT_CHOICES:
    raise InputError(f'--invert {invert!r} is not allowed; choose one of '
                     f'{", ".join(INVERT_CHOICES)}')


def load_image(path: str | os.PathLike, size: tuple[int, int] = (28, 28),
               invert: str = 'auto') -> tuple[np.ndarray, bool]:
  """One image file as the dataset stores images: uint8 ``size`` + (1,), light on dark.

  Returns ``(pixels, inverted)``. The file is read by ``image_folder.read_image``
  (grey, transparent pixels on white), which raises ``DatasetError`` naming it
  when it is missing, unreadable or not an image Pillow can decode.
  """
  from PIL import Image, ImageOps

  from gnet_jax import image_folder

  _check_invert(invert)
  pixels = np.asarray(image_folder.read_image(path, 'L', background='white'), np.uint8)
  do_invert = {'yes': True, 'no': False}.get(invert)
  if do_invert is None:
    do_invert = bool(_border(pixels).mean() > 127)
  if do_invert:
    pixels = 255 - pixels
  background = int(np.median(_border(pixels)))
  fitted = ImageOps.pad(Image.fromarray(pixels, 'L'), size, method=Image.Resampling.LANCZOS,
                        color=background)
  return np.asarray(fitted, np.uint8)[..., None], do_invert


def load_for(spec, path: str | os.PathLike, invert: str = 'auto') -> tuple[np.ndarray, bool]:
  """One file converted the way ``spec``'s data set stores images; ``(pixels, inverted)``.

  Colour data sets (image folders, tensorflow-datasets sets such as cifar10) read
  it as training did (``image_folder.load_rgb``: RGB, shorter side, centre
  crop), never inverted: ``--invert yes`` or ``no`` there is refused rather
  than ignored. The grey MNIST family as ``load_image`` describes.
  """
  if spec.image_shape[-1] == 3:
    from gnet_jax import image_folder
    _check_invert(invert)
    if invert != 'auto':
      raise InputError(f'--invert {invert} applies to grey runs (the MNIST family, light on '
                       f'dark); this run ({spec.name}) reads colour images as they are, never '
                       'inverted: leave --invert out')
    return image_folder.load_rgb(path, spec.image_shape[0], spec.resize_to), False
  return load_image(path, spec.image_shape[:2], invert)


def _batch_size(n: int) -> int:
  """The padded batch for ``n`` images: the next power of two, at most ``MAX_BATCH``."""
  return min(MAX_BATCH, 1 << max(0, n - 1).bit_length())


def make_predict_fn(model: Any, variables: Any, image_size: int,
                    normalization=None) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 NHWC images -> softmax probabilities [N, classes], with one jitted forward pass.

  The same preprocessing as training (``input_pipeline.preprocess``), in fixed-size
  padded batches so that the number of images does not trigger recompiles.
  ``variables``: ``state.variables`` (BatchNorm on its running statistics), or
  a bare params tree for a network without them.
  """
  import jax

  from gnet_jax import input_pipeline, state as state_lib

  @jax.jit
  def probabilities(variables, images):
    logits = model.apply(variables, input_pipeline.preprocess(images, image_size, normalization))
    return jax.nn.softmax(logits.astype(np.float32), axis=-1)

  variables = jax.device_put(state_lib.model_variables(variables))

  def predict(images: np.ndarray) -> np.ndarray:
    out = []
    batch = _batch_size(len(images))
    for start in range(0, len(images), batch):
      chunk = images[start:start + batch]
      padded = np.zeros((batch, *images.shape[1:]), np.uint8)
      padded[:len(chunk)] = chunk
      out.append(np.asarray(probabilities(variables, padded))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

  return predict


def top_k(num_classes: int) -> int:
  """How many classes predict shows: five for 100 classes or more, else three."""
  return 5 if num_classes >= TOP5_FROM_CLASSES else TOP_K


def top_classes(probs: np.ndarray, names: Sequence[str], k: int = TOP_K) -> list[dict]:
  """The ``k`` most likely classes, most likely first: ``{class, name, probability}``."""
  order = np.argsort(-probs, kind='stable')[:k]
  return [{'class': int(i), 'name': names[i], 'probability': float(probs[i])} for i in order]


def predict_images(workdir: str | Path, paths: Sequence[str | os.PathLike],
                   step: int | None = None, invert: str = 'auto') -> list[dict]:
  """The top classes (``top_k``) of each image file under a checkpoint of ``workdir``.

  Returns one dict per path, in order: ``{path, top: [{class, name,
  probability}], inverted, step}`` (``step``: the checkpoint that answered).
  Images are read first, so a bad file fails before any compiling; raises
  ``DatasetError`` for a bad file and ``CheckpointError`` for a workdir
  without a usable checkpoint.
  """
  from gnet_jax import state as state_lib, xla_flags

  if not paths:
    raise InputError('no image files given')
  config, spec = state_lib.read_run(workdir, step)
  loaded = [load_for(spec, p, invert) for p in paths]
  for p, (pixels, _) in zip(paths, loaded):  # the loader's shape must be what the model saw
    if pixels.shape != tuple(spec.image_shape):
      raise DatasetError(f'{p}: converted to {pixels.shape}, but {spec.name} images are '
                         f'{spec.image_shape}')
  host_state, config, restored_step, spec = state_lib.load_checkpoint(workdir, step)
  xla_flags.enable_compilation_cache(config.compilation_cache)
  model = state_lib.create_model(config, spec)
  predict = make_predict_fn(model, host_state.variables, config.image_size, spec.normalization)
  probs = predict(np.stack([pixels for pixels, _ in loaded]))
  k = top_k(spec.num_classes)
  return [{'path': str(p), 'top': top_classes(row, spec.class_names, k), 'inverted': inverted,
           'step': restored_step}
          for p, (_, inverted), row in zip(paths, loaded, probs)]


def format_results(results: list[dict]) -> str:
  """Human-readable: one block per image, the top classes with percentages."""
  lines = []
  width = max([12] + [len(t['name']) for r in results for t in r['top']])
  for r in results:
    note = ' (inverted: dark on light)' if r['inverted'] else ''
    lines.append(f'{r["path"]}{note}')
    for rank, t in enumerate(r['top'], 1):
      lines.append(f'  {rank}. {t["name"]:<{width}} (class {t["class"]}) '
                   f'{100 * t["probability"]:6.2f}%')
  return '\n'.join(lines)


def run(args: argparse.Namespace) -> int:
  results = predict_images(args.workdir, args.images, args.step, args.invert)
  if args.json:
    print(json.dumps(results, indent=2))
  else:
    print(f'checkpoint: step {results[0]["step"]} in '
          f'{Path(args.workdir).absolute() / "checkpoints"}')
    print(format_results(results))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m gnet_jax.predict',
      description='Print the top classes of PNG/JPEG images under a trained checkpoint (the top '
                  '5 for runs of 100 classes or more, such as imported ImageNet weights, else 3).')
  from gnet_jax import cli
  cli.add_checkpoint_flags(parser, 'use')
  parser.add_argument('--invert', choices=INVERT_CHOICES, default='auto',
                      help='grey (MNIST-family) runs: make dark-on-light images light-on-dark '
                           'like the dataset: auto (default) inverts when the border is light, '
                           'yes/no force it; colour runs never invert (yes/no are refused)')
  parser.add_argument('--json', action='store_true', help='print one JSON document')
  parser.add_argument('images', nargs='+', metavar='IMAGE', help='PNG or JPEG files')
  args = parser.parse_args(argv)
  return cli.run_command(run, args)


if __name__ == '__main__':
  from gnet_jax import cli
  cli.collect_garbage_less_often()
  cli.quiet_logs()
  sys.exit(main())

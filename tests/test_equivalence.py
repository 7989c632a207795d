"""gnet_jax computes the same function as the d2l PyTorch GoogLeNet, to float32 precision.

Forward pass (one Inception block, and the whole network), the loss gradient
of every parameter, one real ``train_step`` against ``torch.optim.SGD``, and the
per-stage shape table. Weights always come from the PyTorch reference
(``gnet_jax/torch_reference.py``, nonzero biases) through ``gnet_jax.interop``.
These tests guard any rewrite of ``gnet_jax.models`` (fused convs, custom
pooling): the parameter tree and the numbers must stay the same.
"""

import functools
import importlib.util

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip('torch')
F = torch.nn.functional

from gnet_jax import torch_reference  # noqa: E402
from conftest import REPO  # noqa: E402
from gnet_jax import input_pipeline, interop, models, state as state_lib, train  # noqa: E402

# Measured maxima are printed with ``pytest -s``; the bounds leave ~10x headroom.
LOGITS_ATOL = 1e-4  # the bound for the whole network
BLOCK_ATOL = 1e-5
GRAD_RTOL = 1e-4  # per leaf, relative to that leaf's largest |gradient|
STEP_ATOL = 1e-6  # parameters after one SGD step (lr 0.1)


@pytest.fixture(autouse=True, scope='module')
def _torch_float32_deterministic():
  torch.set_default_dtype(torch.float32)
  threads = torch.get_num_threads()
  torch.set_num_threads(2)
  torch.use_deterministic_algorithms(True)
  yield
  torch.use_deterministic_algorithms(False)
  torch.set_num_threads(threads)


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def torch_forward(net: torch.nn.Module, x_nchw: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return net(torch.from_numpy(x_nchw)).numpy()


@functools.cache
def jitted_apply(module: torch.nn.Module):
  """One jitted ``apply`` per module config: cases with equal shapes compile once."""
  def apply(params, x):
    with jax.default_matmul_precision('float32'):  # no TF32/bf16 passes on accelerators
      return module.apply({'params': params}, x)
  return jax.jit(apply)


def report(what: str, diff: float) -> None:
  print(f'\n[equivalence] max |difference| {what}: {diff:.3g}')


# ----------------------------------------------------------------------------- Inception block


def block_params_from_torch(block: torch.nn.Module) -> dict:
  """Written independently of ``interop``: OIHW -> HWIO per conv."""
  params = {}
  for name, _ in interop.INCEPTION_CONVS:
    conv = getattr(block, name)
    params[name] = {'kernel': conv.weight.detach().numpy().transpose(2, 3, 1, 0),
                    'bias': conv.bias.detach().numpy()}
  return params


@pytest.mark.parametrize('in_channels, c1, c2, c3, c4, hw', [
    (192, 64, (96, 128), (16, 32), 32, (5, 7)),  # b3's first block
    (832, 384, (192, 384), (48, 128), 128, (3, 3)),  # b5's last block
    (3, 2, (4, 5), (3, 6), 7, (1, 9)),  # tiny, 1-pixel high: padding everywhere
])
def test_inception_block_matches_torch(in_channels, c1, c2, c3, c4, hw):
  torch.manual_seed(in_channels)
  block = torch_reference.Inception(in_channels, c1, c2, c3, c4).eval()
  x = np.random.default_rng(in_channels).standard_normal((2, in_channels, *hw), np.float32)
  expected = torch_forward(block, x)
  got = jitted_apply(models.Inception(c1, c2, c3, c4))(block_params_from_torch(block),
                                                       nchw_to_nhwc(x))
  assert got.shape == (2, *hw, c1 + c2[1] + c3[1] + c4)
  report(f'Inception {in_channels}->{got.shape[-1]} at {hw}',
         float(np.abs(np.asarray(got) - nchw_to_nhwc(expected)).max()))
  chex.assert_trees_all_close(np.asarray(got), nchw_to_nhwc(expected), atol=BLOCK_ATOL, rtol=0)


# ----------------------------------------------------------------------------- whole network


# 28x28 is test_loss_matches_torch's size: its losses and gradients compare that forward pass.
@pytest.mark.parametrize('hw, in_channels, num_classes', [
    ((32, 40), 3, 7),
    ((96, 96), 1, 10),
])
def test_logits_match_torch(hw, in_channels, num_classes):
  torch.manual_seed(sum(hw) + in_channels)
  net = torch_reference.googlenet(in_channels, num_classes).eval()
  params = interop.params_from_torch(net.state_dict())
  # Inputs in [0, 1] as the trainer feeds them, shifted so ReLUs are not all on.
  x = np.random.default_rng(0).uniform(-0.5, 1.0, (3, in_channels, *hw)).astype(np.float32)
  expected = torch_forward(net, x)
  got = np.asarray(jitted_apply(models.GoogLeNet(num_classes=num_classes))(params,
                                                                           nchw_to_nhwc(x)))
  assert got.shape == (3, num_classes)
  assert np.abs(expected).max() > 1e-2  # a comparison of near-zero logits would prove little
  report(f'logits {hw} in={in_channels} classes={num_classes}',
         float(np.abs(got - expected).max()))
  chex.assert_trees_all_close(got, expected, atol=LOGITS_ATOL, rtol=0)
  np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))


# ----------------------------------------------------------------------------- gradients and SGD


BATCH, SIZE = 8, 28


@pytest.fixture(scope='module')
def batch():
  rng = np.random.default_rng(8)
  images = rng.integers(0, 256, (BATCH, SIZE, SIZE, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, BATCH).astype(np.int32)
  return images, labels


def torch_images(images: np.ndarray) -> torch.Tensor:
  """The same float32 pixels ``input_pipeline.preprocess`` computes (no resize at stored size)."""
  return torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).float() / 255.0


def assert_leaves_close(got, expected, rtol_of_max: float, what: str) -> float:
  """Per leaf, ``max|got - expected| <= rtol_of_max * max|expected|``; returns the worst diff."""
  worst_abs, worst_rel = 0.0, 0.0
  flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  flat_expected = jax.tree_util.tree_flatten_with_path(expected)[0]
  assert set(flat_got) == {p for p, _ in flat_expected}
  for path, e in flat_expected:
    g, e = np.asarray(flat_got[path]), np.asarray(e)
    diff = float(np.abs(g - e).max())
    scale = float(np.abs(e).max())
    assert diff <= rtol_of_max * scale + 1e-12, (
        f'{what} {jax.tree_util.keystr(path)}: max diff {diff:.3g}, max |value| {scale:.3g}')
    worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / max(scale, 1e-30))
  report(f'{what} (abs)', worst_abs)
  report(f'{what} (relative to the leaf max)', worst_rel)
  return worst_abs


def load_default_config():
  spec = importlib.util.spec_from_file_location('default_config', REPO / 'configs' / 'default.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def capture_gradients() -> optax.GradientTransformation:
  """An identity transformation that keeps the gradients it sees in its state."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (grads, grads))


@pytest.fixture(scope='module')
def one_step(batch):
  """One real ``train.train_step`` (SGD, lr 0.1) and one ``torch.optim.SGD`` step, same start.

  The optimizer is ``state.create_optimizer``'s, chained after a pass-through that
  records the gradients, so one compilation serves both the gradient and the
  step comparison (compiling GoogLeNet's backward pass is the slow part).
  """
  images, labels = batch
  torch.manual_seed(2)
  net = torch_reference.googlenet(1, 10)
  start = interop.params_from_torch(net.state_dict())

  optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
  optimizer.zero_grad()
  loss = F.cross_entropy(net(torch_images(images)), torch.from_numpy(labels).long())
  loss.backward()
  torch_grads = interop.params_from_torch(  # gradients map exactly like the weights
      {k: p.grad for k, p in net.named_parameters()})
  optimizer.step()

  config = load_default_config()
  config.image_size, config.learning_rate, config.momentum = SIZE, 0.1, 0.0
  model = models.GoogLeNet(num_classes=10)
  tx = optax.chain(capture_gradients(), state_lib.create_optimizer(config))
  state = state_lib.create_train_state(config, input_pipeline.dataset_spec('fashion_mnist'),
                                       model, tx)
  state = state.replace(params=start, opt_state=state_lib.init_opt_state(tx, start))

  def step(state, batch):
    with jax.default_matmul_precision('float32'):
      return train.train_step(state, batch, model=model, tx=tx, image_size=SIZE)

  batch = {'image': images, 'label': labels}
  # XLA's backend optimisations only reorder float math within the tolerances; skipping
  # them cuts this compile (the slowest part of the file) from ~40 s to ~15 s of CPU.
  compiled = jax.jit(step).lower(state, batch).compile(
      compiler_options={'xla_backend_optimization_level': 0})
  new_state = jax.device_get(compiled(state, batch))
  return {'start': start, 'state': new_state, 'jax_grads': new_state.opt_state[0],
          'torch_loss': loss.item(), 'torch_grads': torch_grads,
          'torch_params': interop.params_from_torch(net.state_dict())}


def test_loss_matches_torch(one_step):
  jax_loss = float(one_step['state'].metrics['loss_sum']) / BATCH
  report('loss', abs(jax_loss - one_step['torch_loss']))
  np.testing.assert_allclose(jax_loss, one_step['torch_loss'], rtol=1e-6)


def test_gradients_match_torch(one_step):
  assert_leaves_close(one_step['jax_grads'], one_step['torch_grads'], GRAD_RTOL, 'gradients')


def test_sgd_step_matches_torch(one_step):
  assert int(one_step['state'].step) == 1
  expected = one_step['torch_params']
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(expected),
                                                           jax.tree.leaves(one_step['start'])))
  assert moved > 1e-4  # the step really changed the weights
  worst = assert_leaves_close(one_step['state'].params, expected, 1.0,
                              'params after one SGD step')
  assert worst <= STEP_ATOL


# ----------------------------------------------------------------------------- shape table


# The printout of d2l section 8.4 for a 1x96x96 input (NCHW).
D2L_SHAPES_96 = [('Sequential', (1, 64, 24, 24)), ('Sequential', (1, 192, 12, 12)),
                 ('Sequential', (1, 480, 6, 6)), ('Sequential', (1, 832, 3, 3)),
                 ('Sequential', (1, 1024)), ('Linear', (1, 10))]


def stage_output_shapes(model: models.GoogLeNet, params,
                        image_shape: tuple[int, int, int]) -> list:
  """Each top-level stage's output shape (first output of the stages that return extras)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  stages = ('b1', 'b2', 'b3', 'b4', 'b5', 'head')
  is_stage = lambda mdl, method: method == '__call__' and mdl.name in stages  # noqa: E731
  _, state = jax.eval_shape(functools.partial(model.apply, capture_intermediates=is_stage,
                                              mutable=['intermediates']), {'params': params}, x)
  shapes = []
  for name in stages:
    out = state['intermediates'][name]['__call__'][0]
    out = out[0] if isinstance(out, tuple) else out
    shapes.append(tuple(out.shape))
  return shapes


def test_shape_table_matches_torch_reference(capsys):
  net = torch_reference.googlenet(1, 10)
  torch_reference.print_shape_table(net, 1, 96)
  printout = capsys.readouterr().out
  assert 'Sequential output shape:\t(1, 480, 6, 6)' in printout
  table = torch_reference.shape_table(net, 1, 96)
  assert table == D2L_SHAPES_96
  as_nhwc = [(s[0], *s[2:], s[1]) if len(s) == 4 else s for _, s in table]
  params = interop.params_from_torch(net.state_dict())
  assert stage_output_shapes(models.GoogLeNet(num_classes=10), params, (96, 96, 1)) == as_nhwc

"""inception_v1 against torchvision's own GoogLeNet (loaded by torch_reference), random weights.

Sizes: 224x224, and 97x97, where ceil-mode pooling adds a row (24 -> 12, 12 -> 6)
and the aux heads' adaptive pool bins overlap (6 -> 4). Batch 2.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip('torch')  # the suite runs without PyTorch too (README)

from gnet_jax import inception_v1, models, torch_reference  # noqa: E402
from gnet_jax.errors import StateDictError  # noqa: E402

tv = torch_reference.torchvision_models()  # needs torchvision==0.28.0 (the test extra)
SMALL = 97
AUX_WEIGHT = 0.3
LEARNING_RATE = 0.1


def randomized_googlenet(aux_logits: bool = True, seed: int = 0) -> torch.nn.Module:
  """torchvision's GoogLeNet with weights that carry a signal through all 22 layers.

  ``init_weights`` draws N(0, 0.01) convolutions and sets every BatchNorm to the
  identity, under which activations fade and a misplaced BatchNorm tensor could
  hide; He-scaled convolutions and random BatchNorm parameters and statistics
  make each tensor count.
  """
  torch.manual_seed(seed)
  net = tv.googlenet(weights=None, aux_logits=aux_logits, init_weights=True)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.Conv2d):
        torch.nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 1.5)
      elif isinstance(m, torch.nn.Linear):
        torch.nn.init.xavier_uniform_(m.weight)
        m.bias.uniform_(-0.1, 0.1)
  return net


def nhwc(x: torch.Tensor) -> jax.Array:
  return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def assert_close(got, want, rel: float = 1e-4, what: str = ''):
  """Largest difference within ``rel`` of ``want``'s largest magnitude."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  scale = np.abs(want).max()
  assert np.abs(got - want).max() <= rel * scale, (what, np.abs(got - want).max(), scale)


@pytest.fixture(scope='module')
def net():
  return randomized_googlenet().eval()


@pytest.fixture(scope='module')
def variables(net):
  return jax.tree.map(jnp.asarray, inception_v1.variables_from_torchvision(net.state_dict()))


@functools.cache
def evaluate(transform: bool, kernels: str = 'auto'):
  """A compiled eval-mode forward pass, shared across tests (one compile per input shape)."""
  return jax.jit(inception_v1.InceptionV1(transform_input=transform, kernels=kernels).apply)


def test_parameter_tree_is_torchvisions(net, variables):
  """The module's own tree (from ``init``) is the converted one, shape for shape."""
  model = inception_v1.InceptionV1()
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SMALL, SMALL, 3)))
  assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(jnp.shape, variables)
  torch_count = sum(p.numel() for p in net.parameters())
  assert sum(x.size for x in jax.tree.leaves(variables['params'])) == torch_count == 13_004_888
  assert list(inception_v1.state_dict_shapes()) == list(net.state_dict())
  no_aux = inception_v1.InceptionV1(aux_logits=False)
  params = jax.eval_shape(no_aux.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))['params']
  assert sum(x.size for x in jax.tree.leaves(params)) == 6_624_904


# transform_input at the size whose pooling is the edge case (one compile at 224 is enough).
@pytest.mark.parametrize('size, transform', [(224, False), (SMALL, False), (SMALL, True)])
def test_eval_logits_equal_torchvisions(net, variables, size, transform):
  x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
  net.transform_input = transform
  with torch.no_grad():
    want = net(x).numpy()
  net.transform_input = False
  got = evaluate(transform)(variables, nhwc(x))
  assert_close(got, want, what=f'{size}x{size} transform_input={transform}')


def test_eval_logits_with_xlas_stock_kernels(net, variables):
  """``kernels='xla'``, what accelerators run (``auto`` is ``custom`` on this CPU)."""
  x = torch.randn(2, 3, SMALL, SMALL, generator=torch.Generator().manual_seed(5))
  with torch.no_grad():
    want = net(x).numpy()
  assert_close(evaluate(False, 'xla')(variables, nhwc(x)), want)


def test_bfloat16_keeps_batchnorm_statistics_in_float32():
  model = inception_v1.InceptionV1(dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  (logits, aux), updates = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']), variables, x)
  assert logits.dtype == aux[0].dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}


def torch_train(net: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor,
                step: bool, frozen: tuple[str, ...] = ()) -> dict:
  """torchvision's network in training mode, dropout off: outputs, and with ``step`` an SGD step.

  The layers in ``frozen`` are in eval mode: their BatchNorms use and keep their statistics.
  """
  net.train()
  for layer in frozen:
    getattr(net, layer).eval()
  for m in net.modules():
    if isinstance(m, torch.nn.Dropout):
      m.p = 0.0
  before = {k: v.clone() for k, v in net.state_dict().items()}
  logits, aux2, aux1 = net(x)  # torchvision's order
  ce = torch.nn.functional.cross_entropy
  loss = ce(logits, labels) + AUX_WEIGHT * (ce(aux1, labels) + ce(aux2, labels))
  grads = {}
  if step:
    optimizer = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE)
    optimizer.zero_grad()
    loss.backward()
    grads = {name: p.grad.numpy().copy() for name, p in net.named_parameters()}
    optimizer.step()
  return {'before': before, 'grads': grads, 'after': net.state_dict(),
          'outputs': [t.detach().numpy() for t in (loss, logits, aux1, aux2)]}


def flax_train(dtype, variables: dict, x: jax.Array, labels: jax.Array, step: bool,
               frozen: tuple[str, ...] = ()):
  """``InceptionV1`` the same way: (outputs, gradients, variables after the step)."""
  model = inception_v1.InceptionV1(dtype=dtype, frozen_batch_stats=frozen)
  tx = optax.sgd(LEARNING_RATE)

  def loss_fn(params):
    (logits, (aux1, aux2)), updates = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, x, train=True,
        mutable=['batch_stats'])
    ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()
    loss = ce(logits) + AUX_WEIGHT * (ce(aux1) + ce(aux2))
    return loss, ([loss, logits, aux1, aux2], updates['batch_stats'])

  if not step:
    outputs, batch_stats = jax.jit(loss_fn)(variables['params'])[1]
    return outputs, None, {'params': variables['params'], 'batch_stats': batch_stats}

  @jax.jit  # one program: eager, the update's ~200 small ops each compile on their own
  def sgd_step(params):
    grads, (outputs, batch_stats) = jax.grad(loss_fn, has_aux=True)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return outputs, grads, {'params': optax.apply_updates(params, updates),
                            'batch_stats': batch_stats}

  return sgd_step(variables['params'])


def train_batch(seed: int):
  x = torch.randn(2, 3, SMALL, SMALL, generator=torch.Generator().manual_seed(seed))
  return x, torch.tensor([3, 997])


FROZEN = ('conv2', 'inception4c', 'aux2')


@pytest.fixture(scope='module')
def float32_train():
  """Training-mode forward pass (batch statistics, running statistics updated) in float32,
  with the BatchNorms of ``FROZEN`` on their running statistics (torch: those layers in eval)."""
  net = randomized_googlenet(seed=1)
  x, labels = train_batch(1)
  want = torch_train(net, x, labels, step=False, frozen=FROZEN)
  variables = inception_v1.variables_from_torchvision(want['before'])
  got = flax_train(jnp.float32, variables, nhwc(x), jnp.asarray(labels.numpy()), step=False,
                   frozen=FROZEN)
  return want, jax.device_get(got)


@pytest.fixture(scope='module')
def float64_step():
  """One SGD step in float64 on both sides.

  In float32 the two differ where a pre-ReLU value lies within rounding of zero:
  at batch 2 there are a few such values in every network (batch statistics
  amplify rounding), and the one whose ReLU flips moves a gradient entry by the
  whole upstream gradient (errors of 1e-3 to 1e-1 of a tensor's largest entry
  were measured). In float64 none is that close: the outputs agree to 1e-10, and
  the gradients, the step and the statistics to the float32 that
  ``variables_to_torchvision`` writes.
  """
  net = randomized_googlenet(seed=2).double()
  x, labels = train_batch(2)
  want = torch_train(net, x.double(), labels, step=True)
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda v: np.asarray(v, np.float64),
                             inception_v1.variables_from_torchvision(want['before']))
    x = jnp.asarray(x.double().permute(0, 2, 3, 1).numpy())
    got = jax.device_get(flax_train(jnp.float64, variables, x, jnp.asarray(labels.numpy()),
                                    step=True))
  return want, got


def test_train_mode_outputs_equal_torchvisions(float32_train):
  """Loss, logits and both aux heads' logits with batch statistics, float32."""
  want, got = float32_train
  for name, a, b in zip(('loss', 'logits', 'aux1', 'aux2'), got[0], want['outputs']):
    assert_close(a, b, what=name)


def test_running_statistics_equal_torchvisions(float32_train):
  """The running mean and the *unbiased* running variance after a training-mode pass;
  the frozen layers' statistics bit for bit unchanged."""
  want, got = float32_train
  after = inception_v1.variables_to_torchvision(got[2], numpy=True)
  frozen = 0
  for name in want['after']:
    if name.endswith(('running_mean', 'running_var')):
      assert_close(after[name], want['after'][name].numpy(), what=name)
      if name.startswith(FROZEN):
        np.testing.assert_array_equal(after[name], want['before'][name].numpy(), err_msg=name)
        frozen += 1
      else:
        assert not np.array_equal(after[name], want['before'][name].numpy()), name
  assert frozen == 2 * (1 + 6 + 1)  # conv2, inception4c's six, aux2's conv


def test_frozen_batch_stats_must_name_layers():
  model = inception_v1.InceptionV1(frozen_batch_stats=('inception4f',))
  with pytest.raises(ValueError, match=r"names no layer: \['inception4f'\]"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_flax_batchnorm_would_store_the_biased_variance(float32_train):
  """Why ``inception_v1.BatchNorm``: the aux heads' 4x4 maps (n = 2 x 4 x 4) show n/(n-1)."""
  want, got = float32_train
  key = 'aux1.conv.bn.running_var'
  before, after = want['before'][key].numpy(), want['after'][key].numpy()
  batch_var = (after - 0.9 * before) / 0.1  # PyTorch's: the unbiased variance
  n = 2 * 4 * 4
  biased_update = 0.9 * before + 0.1 * batch_var * (n - 1) / n
  ours = inception_v1.variables_to_torchvision(got[2], numpy=True)[key]
  assert np.abs(ours - after).max() < 0.01 * np.abs(biased_update - after).max()


def test_float64_outputs_and_gradients_equal_torchvisions(float64_step):
  want, got = float64_step
  for name, a, b in zip(('loss', 'logits', 'aux1', 'aux2'), got[0], want['outputs']):
    assert_close(a, b, rel=1e-10, what=name)
  grads = inception_v1.variables_to_torchvision(
      {'params': got[1], 'batch_stats': got[2]['batch_stats']}, numpy=True)
  assert set(want['grads']) < set(grads)
  for name, expected in want['grads'].items():
    assert_close(grads[name], expected, rel=1e-6, what=name)


def test_float64_sgd_step_and_statistics_equal_torchvisions(float64_step):
  """Every parameter and running statistic after one step (each of them moved)."""
  want, got = float64_step
  after = inception_v1.variables_to_torchvision(got[2], numpy=True)
  for name, expected in want['after'].items():
    if name.endswith('num_batches_tracked'):
      continue
    expected = expected.numpy()
    moved = np.abs(expected - want['before'][name].numpy()).max()
    assert moved > 0, name
    np.testing.assert_allclose(after[name], expected, rtol=1e-6, atol=1e-6 * moved,
                               err_msg=name)


@pytest.mark.parametrize('aux_logits', [True, False])
def test_import_then_export_loads_strictly_with_identical_logits(aux_logits):
  net = randomized_googlenet(aux_logits, seed=3).eval()
  state_dict = net.state_dict()
  variables = inception_v1.variables_from_torchvision(state_dict)
  assert ('aux1' in variables['params']) == aux_logits
  assert inception_v1.state_dict_layout(state_dict) == (1000, aux_logits)
  exported = inception_v1.variables_to_torchvision(variables)
  assert list(exported) == list(state_dict)
  for key, value in state_dict.items():
    if not key.endswith('num_batches_tracked'):
      assert torch.equal(exported[key], value), key
  fresh = tv.googlenet(weights=None, aux_logits=aux_logits, init_weights=False).eval()
  fresh.load_state_dict(exported, strict=True)
  x = torch.randn(1, 3, 64, 64)
  with torch.no_grad():
    assert torch.equal(fresh(x), net(x))


def test_import_without_num_batches_tracked_and_other_class_counts():
  """Files from before PyTorch 0.4.1 lack ``num_batches_tracked``; fc gives the class count."""
  state_dict = tv.googlenet(weights=None, aux_logits=False, num_classes=7,
                            init_weights=False).state_dict()
  old = {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
  variables = inception_v1.variables_from_torchvision(old)
  assert variables['params']['fc']['kernel'].shape == (1024, 7)
  exported = inception_v1.variables_to_torchvision(variables, num_batches_tracked=5, numpy=True)
  assert exported['conv1.bn.num_batches_tracked'] == 5
  assert exported.keys() == state_dict.keys()


def test_another_architectures_state_dict_names_its_keys():
  d2l = torch_reference.googlenet(in_channels=3, num_classes=1000).state_dict()
  with pytest.raises(StateDictError) as e:
    inception_v1.variables_from_torchvision(d2l)
  message = str(e.value)
  assert "missing state dict keys 'conv1.conv.weight' (64, 3, 7, 7)" in message
  assert "unexpected state dict keys '0.0.weight', '0.0.bias'" in message


def test_wrong_shapes_and_partial_aux_heads_are_refused():
  state_dict = dict(tv.googlenet(weights=None, aux_logits=True, init_weights=False).state_dict())
  state_dict['fc.weight'], state_dict['fc.bias'] = torch.zeros(10, 1024), torch.zeros(10)
  with pytest.raises(StateDictError, match=r"'aux1\.fc2\.weight' has shape \(1000, 1024\), "
                                           r'expected \(10, 1024\)'):
    inception_v1.variables_from_torchvision(state_dict)
  partial = {k: v for k, v in state_dict.items() if not k.startswith('aux2.')}
  with pytest.raises(StateDictError, match=r"missing state dict keys 'aux2\.conv\.conv\.weight'"):
    inception_v1.variables_from_torchvision(partial)
  variables = inception_v1.variables_from_torchvision(
      tv.googlenet(weights=None, aux_logits=False, init_weights=False).state_dict())
  with pytest.raises(StateDictError, match='batch_stats'):
    inception_v1.variables_to_torchvision({'params': variables['params']})
  del variables['batch_stats']['conv1']
  with pytest.raises(StateDictError, match=r"missing variables 'batch_stats/conv1/bn/mean'"):
    inception_v1.variables_to_torchvision(variables)


def test_batchnorm_matches_pytorchs_and_is_the_same_on_one_and_four_devices():
  """An Inception block of BasicConv units in training under pmap (4 devices, 2 examples
  each) gives the outputs and statistics of one device with all 8, and PyTorch's."""
  x = jax.random.normal(jax.random.key(0), (8, 6, 6, 8))
  conv = functools.partial(inception_v1.BasicConv, use_running_average=False)
  block = functools.partial(models.Inception, 4, (4, 6), (2, 3), 3, c3_kernel=3,
                            names=inception_v1.BRANCHES)
  variables = jax.jit(lambda: jax.tree.map(  # one program, not one per op and leaf
      lambda v: v + 0.1 * jax.random.normal(jax.random.key(2), v.shape),
      block(unit=conv).init(jax.random.key(1), x)))()

  def apply(unit, x):
    return block(unit=unit).apply(variables, x, mutable=['batch_stats'])

  one, one_stats = jax.jit(functools.partial(apply, conv))(x)
  four, four_stats = jax.pmap(functools.partial(apply, functools.partial(conv, axis_name='d')),
                              axis_name='d')(x.reshape(4, 2, 6, 6, 8))
  np.testing.assert_allclose(four.reshape(one.shape), one, rtol=1e-5, atol=1e-5)
  for device in range(4):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                 jax.tree.map(lambda s, d=device: s[d], four_stats), one_stats)
  # One BatchNorm against torch.nn.BatchNorm2d (momentum 0.1, eps 1e-3) in training mode.
  bn = torch.nn.BatchNorm2d(8, eps=1e-3)
  with torch.no_grad():
    want = bn(torch.tensor(np.asarray(x)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  got, stats = inception_v1.BatchNorm(use_running_average=False).apply(
      {'params': {'scale': jnp.ones(8), 'bias': jnp.zeros(8)},
       'batch_stats': {'mean': jnp.zeros(8), 'var': jnp.ones(8)}}, x, mutable=['batch_stats'])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats['batch_stats']['mean'], bn.running_mean.numpy(), atol=1e-6)
  np.testing.assert_allclose(stats['batch_stats']['var'], bn.running_var.numpy(), rtol=1e-5)


def test_imagenet_classes_are_torchvisions():
  names = inception_v1.imagenet_classes()
  assert names == tuple(tv.GoogLeNet_Weights.IMAGENET1K_V1.meta['categories'])
  assert len(names) == 1000 and names[0] == 'tench'


def test_dropout_runs_in_training_with_example_keys_only():
  """Three dropouts (head, aux1, aux2) drawn from the example keys when training; none in
  evaluation. Read off the traced program (no compile); ``ops.dropout``'s masks are tested in
  test_ops.py."""
  model = inception_v1.InceptionV1(num_classes=5)
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(1), x)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(2), i))(jnp.arange(2))

  def draws(keys, train):
    program = jax.make_jaxpr(lambda v, k: model.apply(v, x, train=train, example_keys=k,
                                                      mutable=['batch_stats']))(variables, keys)
    return str(program).count('name=_bernoulli')

  assert draws(keys, train=True) == 3
  assert draws(None, train=True) == draws(keys, train=False) == 0

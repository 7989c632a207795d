"""gnet_jax.augment: crops and flips, deterministic in each example's key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gnet_jax import augment


def _batch(n=6, size=12):
  x = jax.random.uniform(jax.random.key(0), (n, size, size, 3))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(1), i))(jnp.arange(n))
  return x, keys


def test_off_is_the_identity():
  x, keys = _batch()
  assert augment.augment(x, keys, 'none', False, 4) is x


@pytest.mark.parametrize('crop', ['pad', 'resized'])
def test_same_keys_same_result_other_keys_other_result(crop):
  x, keys = _batch()
  run = jax.jit(lambda x, k: augment.augment(x, k, crop, True, 3))
  first, again = run(x, keys), run(x, keys)
  np.testing.assert_array_equal(first, again)
  assert first.shape == x.shape
  other = run(x, jax.vmap(lambda k: jax.random.fold_in(k, 9))(keys))
  assert float(jnp.abs(first - other).max()) > 0.05
  # Example i depends on its own key only: the first three alone give the same images.
  np.testing.assert_allclose(run(x[:3], keys[:3]), first[:3], rtol=1e-6, atol=1e-6)


def test_flip_mirrors_about_half_the_images():
  x, keys = _batch(n=64)
  out = augment.augment(x, keys, 'none', True, 0)
  mirrored = [bool(jnp.array_equal(o, i[:, ::-1])) for o, i in zip(out, x)]
  kept = [bool(jnp.array_equal(o, i)) for o, i in zip(out, x)]
  assert all(m != k for m, k in zip(mirrored, kept))
  assert 20 < sum(mirrored) < 44


def test_pad_crop_is_a_shifted_window_with_zero_border():
  x = jnp.arange(1.0, 1.0 + 8 * 8).reshape(8, 8, 1)
  for seed in range(8):
    out = augment.pad_crop(x, jax.random.key(seed), 2)
    padded = np.pad(np.asarray(x), ((2, 2), (2, 2), (0, 0)))
    found = [(dy, dx) for dy in range(5) for dx in range(5)
             if np.array_equal(padded[dy:dy + 8, dx:dx + 8], out)]
    assert len(found) == 1


def test_resized_crop_covers_a_part_and_keeps_the_range():
  x = jnp.broadcast_to(jnp.linspace(0, 1, 32)[None, :, None], (32, 32, 1))  # left-right ramp
  outs = [augment.resized_crop(x, jax.random.key(s)) for s in range(20)]
  spans = [float(o[:, -1].mean() - o[:, 0].mean()) for o in outs]
  assert all(-1e-3 <= float(o.min()) and float(o.max()) <= 1 + 1e-3 for o in outs)
  assert min(spans) < 0.6  # some crops cover a narrow part of the ramp
  assert max(spans) > 0.3

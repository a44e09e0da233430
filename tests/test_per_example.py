"""Per-example clipping of explicit per-example gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax


def _per_example(seed=0, batch=6):
  rng = np.random.default_rng(seed)
  scales = np.geomspace(0.01, 10.0, batch)
  return {
    "w": jnp.asarray(rng.normal(size=(batch, 3, 4)) * scales[:, None, None], "float32"),
    "b": jnp.asarray(rng.normal(size=(batch, 4)) * scales[:, None], "float32"),
  }


def _loop_reference(grads, bound):
  """Clip each example with a Python loop over numpy arrays, then sum."""
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
  total = [np.zeros_like(x[0]) for x in leaves]
  clipped = 0
  for i in range(leaves[0].shape[0]):
    norm = np.sqrt(sum(np.sum(x[i] ** 2) for x in leaves))
    factor = min(1.0, bound / norm) if norm > 0 else 1.0
    clipped += factor < 1.0
    for t, x in zip(total, leaves, strict=True):
      t += factor * x[i]
  return jax.tree.unflatten(jax.tree.structure(grads), total), clipped


@pytest.mark.parametrize("bound", [0.0, 0.05, 1.0, 1e6, np.inf])
@pytest.mark.parametrize("jit", [False, True])
def test_global_clip_matches_loop_and_optax(bound, jit):
  grads = _per_example()
  fn = clipjax.per_example_global_norm_clip
  if jit:
    fn = jax.jit(fn)
  summed, num = fn(grads, bound)
  expected, expected_num = _loop_reference(grads, bound)
  chex.assert_trees_all_close(summed, expected, rtol=1e-5, atol=1e-6)
  assert int(num) == expected_num
  theirs, their_num = optax.per_example_global_norm_clip(jax.tree.leaves(grads), bound)
  chex.assert_trees_all_close(jax.tree.leaves(summed), theirs, rtol=1e-5, atol=1e-6)
  assert int(num) == int(their_num)


def test_nonfinite_examples_are_dropped_and_counted():
  grads = _per_example()
  bad = jax.tree.map(lambda x: x.at[2].set(jnp.nan).at[4].set(jnp.inf), grads)
  summed, num, info = clipjax.per_example_global_norm_clip(bad, 1.0, return_info=True)
  keep = np.asarray([0, 1, 3, 5])
  expected, expected_num = _loop_reference(jax.tree.map(lambda x: x[keep], grads), 1.0)
  chex.assert_trees_all_close(summed, expected, rtol=1e-5, atol=1e-6)
  assert int(num) == expected_num + 2
  assert int(info.num_nonfinite) == 2 and info.norms.shape == (6,)
  # optax leaks the NaN into the sum.
  theirs, _ = optax.per_example_global_norm_clip(jax.tree.leaves(bad), 1.0)
  assert np.isnan(np.asarray(theirs[0])).any()


def test_half_precision_sum_accumulates_in_float32():
  grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _per_example())
  summed, _ = clipjax.per_example_global_norm_clip(grads, 1.0)
  chex.assert_trees_all_equal_dtypes(summed, jax.tree.map(lambda x: x[0], grads))
  expected, _ = _loop_reference(grads, 1.0)
  chex.assert_trees_all_close(
    jax.tree.map(lambda x: x.astype(jnp.float32), summed),
    expected,
    rtol=2e-2,
    atol=1e-2,
  )


@pytest.mark.parametrize("uniform", [True, False])
def test_layer_clip_matches_optax_and_per_leaf_loop(uniform):
  grads = _per_example(3)
  summed, nums = clipjax.per_example_layer_norm_clip(grads, 2.0, uniform=uniform)
  leaves = jax.tree.leaves(grads)
  theirs, their_nums = optax.per_example_layer_norm_clip(leaves, 2.0, uniform=uniform)
  chex.assert_trees_all_close(jax.tree.leaves(summed), theirs, rtol=1e-5, atol=1e-6)
  assert [int(n) for n in jax.tree.leaves(nums)] == [int(n) for n in their_nums]
  total = sum(x[0].size for x in leaves)
  for key, x in grads.items():
    bound = 2.0 / np.sqrt(2) if uniform else 2.0 * np.sqrt(x[0].size / total)
    expected, expected_num = _loop_reference({"x": x}, bound)
    np.testing.assert_allclose(summed[key], expected["x"], rtol=1e-5, atol=1e-6)
    assert int(nums[key]) == expected_num


def test_missing_batch_dimension_is_a_clear_error():
  with pytest.raises(ValueError, match="expects `grads` to have a batch dimension"):
    clipjax.per_example_global_norm_clip(
      {"a": jnp.ones((3,)), "b": jnp.ones((2,))}, 1.0
    )
  with pytest.raises(ValueError, match="per_example_layer_norm_clip"):
    clipjax.per_example_layer_norm_clip([jnp.ones(())], 1.0)

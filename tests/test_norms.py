"""Kernels: norms per scope, overflow safety, safe scale factors, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipjax import _norms


def _np_norm(x, axis=None):
  x = np.asarray(x, np.float64)
  return np.sqrt(np.sum(x * x, axis=axis))


@pytest.mark.parametrize("jit", [False, True])
def test_global_norm_matches_numpy(jit):
  rng = np.random.default_rng(0)
  tree = {
    "a": rng.normal(size=(3, 4)).astype(np.float32),
    "b": [rng.normal(size=(5,)).astype(np.float32), None],
  }
  fn = jax.jit(_norms.global_norm) if jit else _norms.global_norm
  expected = np.sqrt(_np_norm(tree["a"]) ** 2 + _np_norm(tree["b"][0]) ** 2)
  np.testing.assert_allclose(fn(tree), expected, rtol=1e-6)


def test_global_norm_of_empty_trees_is_zero():
  for tree in ({}, [], None, {"a": None}, {"a": jnp.zeros((0, 3))}):
    assert float(_norms.global_norm(tree)) == 0.0


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_sum_of_squares_that_overflows_gives_finite_norm(dtype):
  big = 6e4 if dtype == jnp.float16 else 1e30  # squares overflow in-dtype
  x = jnp.full((64,), big, dtype)
  norm = _norms.global_norm({"x": x})
  assert norm.dtype == jnp.float32
  expected = float(x[0].astype(np.float32)) * 8.0  # sqrt(64) = 8
  np.testing.assert_allclose(float(norm), expected, rtol=1e-6)
  # The naive in-dtype computation does overflow: the test is not vacuous.
  assert not np.isfinite(float(jnp.sqrt(jnp.sum(jnp.square(x)))))


def test_float32_overflow_rescales_and_true_inf_stays_inf():
  x = jnp.full((4,), 1e30, jnp.float32)
  np.testing.assert_allclose(float(_norms.global_norm(x)), 2e30, rtol=1e-6)
  y = x.at[0].set(jnp.inf)
  assert float(_norms.global_norm(y)) == np.inf
  assert np.isnan(float(_norms.global_norm(x.at[0].set(jnp.nan))))


def test_overflow_across_leaves_combines_safely():
  tree = [jnp.full((1,), 3e19, jnp.float32), jnp.full((1,), 4e19, jnp.float32)]
  np.testing.assert_allclose(float(_norms.global_norm(tree)), 5e19, rtol=1e-6)


def test_float64_accumulates_in_float64():
  with jax.enable_x64(True):
    x = jnp.asarray([1.0, 1e-9], jnp.float64)
    norm = _norms.global_norm(x)
    assert norm.dtype == jnp.float64
    mixed = {"a": x, "b": jnp.ones((2,), jnp.float32)}
    assert _norms.global_norm(mixed).dtype == jnp.float64


def test_block_norms_per_axis_and_per_example():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 3, 5)).astype(np.float32)
  (per_slice,) = _norms.block_norms([jnp.asarray(x)], [(1, 2)])
  np.testing.assert_allclose(per_slice, _np_norm(x, axis=(1, 2)), rtol=1e-6)
  y = rng.normal(size=(4, 2)).astype(np.float32)
  (per_example,) = _norms.block_norms(
    [jnp.asarray(x), jnp.asarray(y)], [(1, 2), (1,)], combine=True
  )
  expected = np.sqrt(_np_norm(x, (1, 2)) ** 2 + _np_norm(y, 1) ** 2)
  np.testing.assert_allclose(per_example, expected, rtol=1e-6)


def test_clip_scale_formula_and_zero_cases():
  norms = jnp.asarray([0.0, 0.5, 2.0, 4.0, np.inf], jnp.float32)
  scale = _norms.clip_scale(norms, 2.0)
  np.testing.assert_array_equal(scale, [1.0, 1.0, 1.0, 0.5, 0.0])
  assert float(_norms.clip_scale(jnp.zeros(()), 0.0)) == 1.0
  # eps as in torch: min(1, c / (n + eps)).
  np.testing.assert_allclose(
    float(_norms.clip_scale(jnp.asarray(2.0), 2.0, 1e-6)), 2.0 / (2.0 + 1e-6)
  )


def test_clip_scale_gradient_is_finite_at_zero_norm():
  grad = jax.grad(lambda n: _norms.clip_scale(n, 0.0))(jnp.zeros(()))
  assert np.isfinite(float(grad))


@pytest.mark.parametrize("bad", [-1.0, np.nan])
def test_traced_bad_bound_acts_as_zero(bad):
  scale = jax.jit(_norms.clip_scale)(jnp.asarray(3.0), jnp.asarray(bad))
  assert float(scale) == 0.0


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_scale_leaf_keeps_dtype_and_rounds_once(dtype):
  x = jnp.asarray([1.0, 3.0, -7.0], dtype)
  scale = jnp.asarray(1.0 / 3.0, jnp.float32)
  out = _norms.scale_leaf(x, scale)
  assert out.dtype == dtype
  expected = (np.asarray(x, np.float32) * np.float32(1 / 3)).astype(dtype)
  np.testing.assert_array_equal(np.asarray(out), expected)


def test_unit_axes_follow_optax_conventions():
  shapes = {
    (5,): None,
    (1, 5): None,
    (3, 4): (0,),
    (2, 3, 4): (0,),
    (3, 3, 2, 4): (0, 1, 2),
    (2, 3, 3, 2, 4): (0, 1, 2, 3),
  }
  for shape, axes in shapes.items():
    assert _norms.unit_axes(jnp.zeros(shape)) == axes
  with pytest.raises(ValueError, match="Expected parameter with shape"):
    _norms.unit_axes(jnp.zeros((2,) * 6))


def test_normalize_axes_errors_name_the_call():
  with pytest.raises(ValueError, match=r"my_call: axis=\(3,\) is out of range"):
    _norms.normalize_axes("my_call", jnp.zeros((2, 2)), (3,))
  assert _norms.normalize_axes("c", jnp.zeros((2, 3, 4)), -1) == (2,)
  assert _norms.normalize_axes("c", jnp.zeros((2, 3)), lambda x: (1,)) == (1,)


def test_check_float_leaves_names_the_leaf():
  with pytest.raises(TypeError, match=r"clip_by_norm: leaf \['n'\] has dtype int32"):
    _norms.check_float_leaves("clip_by_norm", {"n": jnp.zeros(2, jnp.int32)})

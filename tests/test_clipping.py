"""Clippers: parity with optax, properties on random trees, edge cases, errors."""

import re

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clipjax


def _tree(seed=0, scale=1.0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return {
    "dense": {
      "kernel": jnp.asarray(scale * rng.normal(size=(4, 3)), dtype),
      "bias": jnp.asarray(scale * rng.normal(size=(3,)), dtype),
    },
    "conv": jnp.asarray(scale * rng.normal(size=(3, 3, 2, 4)), dtype),
    "heads": [jnp.asarray(scale * rng.normal(size=(2, 3, 5)), dtype)],
  }


def _np_global_norm(tree):
  return np.sqrt(
    sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))
  )


# --- parity with optax, where optax is right ---------------------------------

OPTAX_TWINS = [
  ("clip", (0.3,)),
  ("clip_by_global_norm", (1.0,)),
  ("clip_by_global_norm", (100.0,)),
  ("clip_by_block_rms", (0.5,)),
  ("adaptive_grad_clip", (0.05,)),
  ("adaptive_grad_clip", (0.05, 1e-2, (0,))),
]


@pytest.mark.parametrize("name,args", OPTAX_TWINS)
@pytest.mark.parametrize("jit", [False, True])
def test_same_results_as_optax(name, args, jit):
  grads, params = _tree(0), _tree(1)
  if name == "adaptive_grad_clip" and args[2:] == ((0,),):
    grads, params = grads["dense"], params["dense"]
  ours, theirs = getattr(clipjax, name)(*args), getattr(optax, name)(*args)
  update = jax.jit(ours.update) if jit else ours.update
  u_ours, _ = update(grads, ours.init(params), params)
  u_theirs, _ = theirs.update(grads, theirs.init(params), params)
  chex.assert_trees_all_close(u_ours, u_theirs, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_equal_dtypes(u_ours, grads)


def test_clip_without_stats_is_optax_clip_with_an_empty_state():
  grads = _tree(0)
  tx = clipjax.clip(0.3, stats=False)
  state = tx.init(grads)
  assert state == optax.EmptyState()
  u, new_state = jax.jit(tx.update)(grads, state)
  chex.assert_trees_all_equal(u, optax.clip(0.3).update(grads, None)[0])
  assert new_state == optax.EmptyState()
  assert clipjax.clip_stats(new_state) == {}
  with pytest.raises(TypeError, match="clip: stats must be True or False, got 1"):
    clipjax.clip(0.3, stats=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (2, 3, 4)])
def test_clip_statistics_of_any_shape_including_empty(shape):
  x = jnp.asarray(np.arange(np.prod(shape), dtype=np.float32).reshape(shape) - 5.0)
  u, state = jax.jit(clipjax.clip(2.0).update)({"a": x}, None)
  chex.assert_trees_all_equal(u["a"], jnp.clip(x, -2.0, 2.0))
  peak = float(jnp.max(jnp.abs(x))) if x.size else 0.0
  assert float(state.norm["a"]) == peak
  expected = float(jnp.mean(jnp.abs(x) > 2.0)) if x.size else 0.0
  np.testing.assert_allclose(float(state.clipped_fraction), expected, rtol=1e-6)


def test_clip_without_stats_compiles_to_optax_clips_program():
  """No overhead by construction: the same optimized HLO as optax.clip + sgd."""
  params = {"a": jnp.ones((64, 32)), "b": jnp.ones((7,), jnp.bfloat16)}

  def program(clipper):
    tx = optax.chain(clipper, optax.sgd(0.1))

    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    text = jax.jit(step).lower(params, tx.init(params), params).compile().as_text()
    # The computations and their instructions, without the metadata that names
    # the Python source of each op and the numbering that follows the tracing.
    lines = [ln for ln in text.splitlines() if re.match(r"\s*(ROOT )?%|ENTRY", ln)]
    lines = [re.sub(r", metadata=\{[^}]*\}", "", ln) for ln in lines]
    return [re.sub(r"(%[A-Za-z_][\w-]*)\.\d+", r"\1", ln) for ln in lines]

  assert program(clipjax.clip(0.1, stats=False)) == program(optax.clip(0.1))


def test_unitwise_functions_match_optax():
  for x in jax.tree.leaves(_tree(2)):
    chex.assert_trees_all_close(
      clipjax.unitwise_norm(x), optax.transforms.unitwise_norm(x), rtol=1e-6
    )
    n = clipjax.unitwise_norm(x)
    bound = jnp.full_like(n, 0.5)
    chex.assert_trees_all_close(
      clipjax.unitwise_clip(n, bound, x),
      optax.transforms.unitwise_clip(n, bound, x),
      rtol=1e-6,
    )
  x = jnp.ones((2, 3, 4))
  chex.assert_trees_all_close(
    clipjax.unitwise_norm(x, axis=(1, 2)),
    optax.transforms.unitwise_norm(x, axis=(1, 2)),
  )


def test_unitwise_clip_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r"unitwise_clip: .* one shape"):
    clipjax.unitwise_clip(jnp.ones(3), jnp.ones(2), jnp.ones(3))


# --- where optax is numerically wrong ------------------------------------------


def test_zero_norm_with_zero_bound_gives_zeros_not_nan():
  zeros = {"a": jnp.zeros((3,)), "b": jnp.zeros((2, 2))}
  for tx in (clipjax.clip_by_global_norm(0.0), clipjax.clip_by_block_rms(0.0)):
    u, _ = tx.update(zeros, None)
    chex.assert_trees_all_equal(u, zeros)
  # optax's twins do produce NaN here.
  u, _ = optax.clip_by_global_norm(0.0).update(zeros, None)
  assert np.isnan(np.asarray(u["a"])).all()


@pytest.mark.parametrize("dtype,big", [(jnp.float16, 3e4), (jnp.bfloat16, 1e25)])
def test_half_precision_overflow_clips_to_finite_result_of_right_norm(dtype, big):
  grads = {"w": jnp.full((256,), big, dtype), "b": jnp.full((4,), -big, dtype)}
  for tx in (clipjax.clip_by_global_norm(1.0), clipjax.clip_by_norm(1.0)):
    u, stats = tx.update(grads, tx.init(grads))
    chex.assert_trees_all_equal_dtypes(u, grads)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(u))
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(stats.norm))
  u, _ = clipjax.clip_by_global_norm(1.0).update(grads, None)
  np.testing.assert_allclose(_np_global_norm(u), 1.0, rtol=1e-2)
  u_optax, _ = optax.clip_by_global_norm(1.0).update(grads, None)
  assert _np_global_norm(u_optax) == 0.0 or not np.isfinite(_np_global_norm(u_optax))


def test_agc_half_precision_matches_float32_reference():
  grads, params = _tree(0, scale=300.0), _tree(1)
  half = jax.tree.map(lambda x: x.astype(jnp.float16), grads)
  tx = clipjax.adaptive_grad_clip(0.05)
  u_half, _ = tx.update(half, tx.init(params), params)
  u_ref, _ = optax.adaptive_grad_clip(0.05).update(grads, None, params)
  chex.assert_trees_all_close(
    jax.tree.map(lambda x: x.astype(jnp.float32), u_half), u_ref, rtol=2e-3, atol=1e-4
  )


# --- properties on random trees ------------------------------------------------

# Magnitudes whose squares neither underflow nor overflow float32: norms of
# elements all below ~1e-19 underflow to zero (and are then left untouched).
_element = st.one_of(
  st.just(0.0), st.floats(2**-26, 1e3, width=32), st.floats(-1e3, -(2**-26), width=32)
)
_leaf = hnp.arrays(
  np.float32, hnp.array_shapes(min_dims=0, max_dims=2, max_side=3), elements=_element
)
_trees = st.dictionaries(st.sampled_from("abcdef"), _leaf, min_size=0, max_size=4)
_bounds = st.floats(1e-3, 1e3)


@settings(max_examples=30, deadline=None)
@given(tree=_trees, bound=_bounds)
def test_global_norm_properties(tree, bound):
  tx = clipjax.clip_by_global_norm(bound)
  u, stats = tx.update(tree, None)
  norm_in, norm_out = _np_global_norm(tree), _np_global_norm(u)
  assert norm_out <= bound * (1 + 1e-6) + 1e-30
  if norm_in <= bound:
    chex.assert_trees_all_equal(u, tree)  # under the bound: untouched
  else:
    np.testing.assert_allclose(norm_out, bound, rtol=1e-5)
    # direction kept: u is a positive multiple of the input
    s = float(stats.scale)
    chex.assert_trees_all_close(u, jax.tree.map(lambda x: x * s, tree), rtol=1e-6)
  twice, _ = tx.update(u, None)
  chex.assert_trees_all_close(twice, u, rtol=1e-6)  # idempotent
  np.testing.assert_allclose(float(stats.norm), norm_in, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(tree=_trees, bound=_bounds)
def test_per_leaf_norm_properties(tree, bound):
  u, _ = clipjax.clip_by_norm(bound).update(tree, None)
  for key, x in tree.items():
    n_in, n_out = _np_global_norm(x), _np_global_norm(u[key])
    assert n_out <= bound * (1 + 1e-6)
    if n_in <= bound:
      np.testing.assert_array_equal(u[key], x)
    else:
      np.testing.assert_allclose(n_out, bound, rtol=1e-5)
  twice, _ = clipjax.clip_by_norm(bound).update(u, None)
  chex.assert_trees_all_close(twice, u, rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(tree=_trees, bound=_bounds)
def test_value_and_block_rms_properties(tree, bound):
  u, _ = clipjax.clip(bound).update(tree, None)
  for key, x in tree.items():
    np.testing.assert_array_equal(u[key], np.clip(x, -bound, bound))
  u, _ = clipjax.clip_by_block_rms(bound).update(tree, None)
  for key, x in tree.items():
    rms = np.sqrt(np.mean(np.asarray(u[key], np.float64) ** 2)) if x.size else 0.0
    assert rms <= bound * (1 + 1e-5)
  twice, _ = clipjax.clip_by_block_rms(bound).update(u, None)
  chex.assert_trees_all_close(twice, u, rtol=1e-6)


def test_fifty_bounds_give_exactly_the_bound():
  tree = _tree(3, scale=10.0)
  clip = jax.jit(lambda b, t: clipjax.clip_by_global_norm(b).update(t, None)[0])
  for bound in np.geomspace(1e-3, 10.0, 50, dtype=np.float32):
    u = clip(bound, tree)
    np.testing.assert_allclose(_np_global_norm(u), bound, rtol=1e-6)


# --- new clippers --------------------------------------------------------------


def test_clip_by_norm_per_slice_of_stacked_leaf():
  rng = np.random.default_rng(4)
  stacked = jnp.asarray(rng.normal(size=(3, 4, 5)) * [[[0.1]], [[10.0]], [[1.0]]])
  stacked = stacked.astype(jnp.float32)
  u, stats = clipjax.clip_by_norm(1.0, axis=(1, 2)).update(stacked, None)
  for layer in range(3):
    n_in = _np_global_norm(stacked[layer])
    expected = stacked[layer] * min(1.0, 1.0 / n_in)
    np.testing.assert_allclose(u[layer], expected, rtol=1e-6)
  assert stats.norm.shape == (3,)
  np.testing.assert_allclose(float(stats.clipped_fraction), 2 / 3)
  # A callable picks the axes per leaf, for mixed ranks.
  tree = {"w": stacked, "b": jnp.ones((3, 5), jnp.float32)}
  tx = clipjax.clip_by_norm(1.0, axis=lambda x: tuple(range(1, x.ndim)))
  u, stats = tx.update(tree, None)
  assert stats.norm["b"].shape == (3,)
  np.testing.assert_allclose(np.linalg.norm(u["b"], axis=1), 1.0, rtol=1e-6)


def test_clip_by_group_norm_against_numpy():
  tree = _tree(5)
  labels = {"dense": {"kernel": "d", "bias": "d"}, "conv": "c", "heads": ["c"]}
  bounds = {"d": 0.5, "c": 2.0}
  u, stats = clipjax.clip_by_group_norm(bounds, labels).update(tree, None)
  groups = {
    "d": [tree["dense"]["kernel"], tree["dense"]["bias"]],
    "c": [tree["conv"], tree["heads"][0]],
  }
  out = {
    "d": [u["dense"]["kernel"], u["dense"]["bias"]],
    "c": [u["conv"], u["heads"][0]],
  }
  for label, members in groups.items():
    n = _np_global_norm(members)
    factor = min(1.0, bounds[label] / n)
    for x, y in zip(members, out[label], strict=True):
      np.testing.assert_allclose(y, np.asarray(x) * factor, rtol=1e-6)
    np.testing.assert_allclose(float(stats.norm[label]), n, rtol=1e-6)


# (bound, eps, the tree's norm), each a case where eps changes the result, and
# eps=0 at the bound, where the tree is left as it is.
GLOBAL_NORM_EPS_CASES = [
  (1.0, 0.5, 1.0),  # at the bound: scaled by 1 / 1.5 only because of eps
  (1.0, 0.5, 0.9),  # below the bound, pushed over it by eps
  (2.0, 1.0, 3.0),  # above it: 2 / 4 instead of 2 / 3
  (1e-6, 1e-6, 1e-6),  # torch's eps on a gradient as small as the bound: halved
  (1.0, 0.0, 1.0),
]


@pytest.mark.parametrize("bound,eps,norm", GLOBAL_NORM_EPS_CASES)
@pytest.mark.parametrize("jit", [False, True])
def test_clip_by_global_norm_eps_against_numpy(bound, eps, norm, jit):
  raw = _tree(7)
  grads = jax.tree.map(lambda x: x * np.float32(norm / _np_global_norm(raw)), raw)
  n = _np_global_norm(grads)
  scale = min(1.0, bound / (n + eps))  # g * min(1, c / (||g|| + eps)), float64
  if eps > 0:
    assert abs(scale - min(1.0, bound / n)) > 0.1  # dropping eps would show
  tx = clipjax.clip_by_global_norm(bound, eps=eps)
  update = jax.jit(tx.update) if jit else tx.update
  out, stats = update(grads, tx.init(grads))
  for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(out), strict=True):
    assert y.dtype == x.dtype
    np.testing.assert_allclose(y, np.asarray(x, np.float64) * scale, rtol=2e-6)
  np.testing.assert_allclose(float(stats.norm), n, rtol=1e-6)
  np.testing.assert_allclose(float(stats.scale), scale, rtol=1e-6)


def test_clip_by_group_norm_with_callable_and_single_bound():
  tree = _tree(6)

  def by_rank(params):
    return jax.tree.map(lambda p: "matrix" if p.ndim > 1 else "vector", params)

  tx = clipjax.clip_by_group_norm(0.1, by_rank)
  u, stats = tx.update(tree, tx.init(tree), tree)
  assert set(stats.norm) == {"matrix", "vector"}
  np.testing.assert_allclose(_np_global_norm(u["dense"]["bias"]), 0.1, rtol=1e-6)
  with pytest.raises(ValueError, match=r"clip_by_group_norm: no max_norm for group"):
    clipjax.clip_by_group_norm({"matrix": 1.0}, by_rank).update(tree, None, tree)


# --- statistics ----------------------------------------------------------------


def test_stats_record_what_happened():
  g = {"a": jnp.asarray([3.0, 4.0]), "b": jnp.asarray([0.0, 0.1])}
  tx = clipjax.clip_by_global_norm(1.0)
  state = tx.init(g)
  assert isinstance(state, clipjax.ClipStats) and float(state.norm) == 0.0
  _, stats = tx.update(g, state)
  np.testing.assert_allclose(float(stats.norm), _np_global_norm(g), rtol=1e-6)
  np.testing.assert_allclose(float(stats.scale), 1.0 / _np_global_norm(g), rtol=1e-6)
  assert float(stats.bound) == 1.0 and float(stats.clipped_fraction) == 1.0
  _, stats = clipjax.clip_by_norm(1.0).update(g, None)
  assert float(stats.clipped_fraction) == 0.5
  np.testing.assert_allclose(float(stats.scale["a"]), 0.2, rtol=1e-6)
  _, stats = clipjax.clip_by_block_rms(1.0).update(g, None)
  np.testing.assert_allclose(float(stats.norm["a"]), 5 / np.sqrt(2), rtol=1e-6)


def test_agc_stats_are_per_unit():
  params, grads = _tree(7), _tree(8)
  tx = clipjax.adaptive_grad_clip(0.01)
  _, stats = tx.update(grads, tx.init(params), params)
  assert stats.norm["dense"]["kernel"].shape == (3,)
  assert stats.bound["conv"].shape == (4,)
  np.testing.assert_allclose(
    stats.bound["dense"]["kernel"],
    0.01 * np.linalg.norm(params["dense"]["kernel"], axis=0),
    rtol=1e-6,
  )


# --- errors --------------------------------------------------------------------

CONSTRUCTORS = [
  ("clip", lambda v: clipjax.clip(v), "max_delta"),
  ("clip_by_global_norm", lambda v: clipjax.clip_by_global_norm(v), "max_norm"),
  ("clip_by_global_norm", lambda v: clipjax.clip_by_global_norm(1.0, eps=v), "eps"),
  ("clip_by_norm", lambda v: clipjax.clip_by_norm(v), "max_norm"),
  ("clip_by_block_rms", lambda v: clipjax.clip_by_block_rms(v), "threshold"),
  ("adaptive_grad_clip", lambda v: clipjax.adaptive_grad_clip(v), "clipping"),
  ("adaptive_grad_clip", lambda v: clipjax.adaptive_grad_clip(0.1, v), "eps"),
  ("clip_by_group_norm", lambda v: clipjax.clip_by_group_norm(v, {}), "max_norm"),
  (
    "clip_by_group_norm",
    lambda v: clipjax.clip_by_group_norm({"x": v}, {}),
    r"max_norm\['x'\]",
  ),
]


@pytest.mark.parametrize("call,make,arg", CONSTRUCTORS)
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_bad_bounds_raise_naming_call_and_value(call, make, arg, value):
  with pytest.raises(ValueError, match=rf"{call}\({arg}={value!r}\)"):
    make(value)


def test_per_example_bounds_may_be_infinite_but_not_negative():
  grads = [jnp.ones((2, 3))]
  clipjax.per_example_global_norm_clip(grads, jnp.inf)
  with pytest.raises(ValueError, match="per_example_global_norm_clip"):
    clipjax.per_example_global_norm_clip(grads, -1.0)


@pytest.mark.parametrize("name", ["clip", "clip_by_global_norm", "clip_by_norm"])
def test_integer_leaves_raise_type_error(name):
  tx = getattr(clipjax, name)(1.0)
  with pytest.raises(TypeError, match=rf"{name}: leaf \['i'\] has dtype int32"):
    tx.update({"i": jnp.ones(3, jnp.int32)}, None)


def test_agc_without_params_raises():
  tx = clipjax.adaptive_grad_clip(0.1)
  with pytest.raises(ValueError, match="adaptive_grad_clip needs the parameters"):
    tx.update(_tree(0), None)


def test_empty_tree_and_none_leaves():
  for name, args in [*OPTAX_TWINS[:4], ("clip_by_norm", (1.0,))]:
    tx = getattr(clipjax, name)(*args)
    for tree in ({}, {"a": None, "b": jnp.ones(2)}):
      u, _state = tx.update(tree, tx.init(tree), tree)
      assert jax.tree.structure(u) == jax.tree.structure(tree)

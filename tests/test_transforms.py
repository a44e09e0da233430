"""Clippers work wherever optax works: wrappers, jit, vmap, sharding, dtypes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import clipjax

CLIPPERS = {
  "clip": lambda b: clipjax.clip(b),
  "clip_by_global_norm": lambda b: clipjax.clip_by_global_norm(b),
  "clip_by_norm": lambda b: clipjax.clip_by_norm(b),
  "clip_by_block_rms": lambda b: clipjax.clip_by_block_rms(b),
  "adaptive_grad_clip": lambda b: clipjax.adaptive_grad_clip(b),
  "clip_by_group_norm": lambda b: clipjax.clip_by_group_norm(
    b, lambda p: jax.tree.map(lambda x: f"rank{x.ndim}", p)
  ),
}


def _params(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {
    "w": jnp.asarray(rng.normal(size=(8, 4)), dtype),
    "b": jnp.asarray(rng.normal(size=(4,)), dtype),
  }


def _grads(seed=1, scale=3.0, dtype=jnp.float32):
  return jax.tree.map(lambda x: scale * x, _params(seed, dtype))


@pytest.mark.parametrize("name", list(CLIPPERS))
def test_chain_jit_and_state_none(name):
  params, grads = _params(), _grads()
  tx = CLIPPERS[name](0.5)
  expected, _ = tx.update(grads, tx.init(params), params)
  chained = optax.chain(CLIPPERS[name](0.5), optax.sgd(0.1))
  state = chained.init(params)
  updates, state = jax.jit(chained.update)(grads, state, params)
  chex.assert_trees_all_close(updates, jax.tree.map(lambda u: -0.1 * u, expected))
  if name != "adaptive_grad_clip":
    none_updates, _ = tx.update(grads, None)  # stateless use, as in optax
    chex.assert_trees_all_close(none_updates, expected)


@pytest.mark.parametrize("name", list(CLIPPERS))
def test_eval_shape_of_init(name):
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _params())
  tx = CLIPPERS[name](1.0)
  shapes = jax.eval_shape(tx.init, abstract)
  concrete = tx.init(_params())
  assert jax.tree.structure(shapes) == jax.tree.structure(concrete)


def test_wrappers_and_clip_stats_names():
  params, grads = _params(), _grads()
  tx = optax.named_chain(
    ("guard", clipjax.clip_by_global_norm(1.0)),
    ("per_leaf", clipjax.clip_by_norm(0.1)),
    ("opt", optax.sgd(1e-3, momentum=0.9)),
  )
  _, state = tx.update(grads, tx.init(params), params)
  stats = clipjax.clip_stats(state)
  assert "guard/clip_by_global_norm/norm" in stats
  assert "per_leaf/clip_by_norm/norm/w" in stats
  np.testing.assert_allclose(
    stats["guard/clip_by_global_norm/norm"], optax.tree.norm(grads), rtol=1e-6
  )

  # Repeated clippers get distinct names.
  twice = optax.chain(
    clipjax.clip_by_global_norm(2.0), clipjax.clip_by_global_norm(1.0)
  )
  _, state = twice.update(grads, twice.init(params))
  stats = clipjax.clip_stats(state)
  assert float(stats["clip_by_global_norm/bound"]) == 2.0
  assert float(stats["clip_by_global_norm_1/bound"]) == 1.0

  labels = {"w": "matrix", "b": "vector"}
  multi = optax.multi_transform(
    {"matrix": clipjax.clip_by_norm(0.1), "vector": optax.identity()}, labels
  )
  _, state = multi.update(grads, multi.init(params), params)
  assert set(clipjax.clip_stats(state)) == {
    "matrix/clip_by_norm/norm/w",
    "matrix/clip_by_norm/scale/w",
    "matrix/clip_by_norm/bound/w",
    "matrix/clip_by_norm/clipped_fraction",
  }


@pytest.fixture
def standard_promotion():
  """optax's MultiSteps and apply_if_finite mix int32 and float32 internally."""
  with jax.numpy_dtype_promotion("standard"):
    yield


@pytest.mark.usefixtures("standard_promotion")
def test_masked_multisteps_and_apply_if_finite():
  params, grads = _params(), _grads()
  masked = optax.masked(clipjax.clip_by_global_norm(0.1), {"w": True, "b": False})
  u, state = masked.update(grads, masked.init(params), params)
  np.testing.assert_array_equal(u["b"], grads["b"])
  np.testing.assert_allclose(optax.tree.norm(u["w"]), 0.1, rtol=1e-6)
  assert "clip_by_global_norm/norm" in clipjax.clip_stats(state)

  inner = optax.chain(clipjax.clip_by_global_norm(0.1), optax.sgd(1.0))
  multi = optax.MultiSteps(inner, every_k_schedule=2)
  state = multi.init(params)
  for _ in range(2):
    u, state = jax.jit(multi.update)(grads, state, params)
  np.testing.assert_allclose(optax.tree.norm(u), 0.1, rtol=1e-6)
  np.testing.assert_allclose(
    clipjax.clip_stats(state)["clip_by_global_norm/norm"],
    optax.tree.norm(grads),
    rtol=1e-6,
  )

  safe = optax.apply_if_finite(inner, max_consecutive_errors=3)
  state = safe.init(params)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)
  u, state = safe.update(bad, state, params)
  assert float(optax.tree.norm(u)) == 0.0
  assert int(state.notfinite_count) == 1


def test_inject_hyperparams_changes_bound_without_recompiling():
  params, grads = _params(), _grads()
  tx = optax.inject_hyperparams(clipjax.clip_by_global_norm)(max_norm=1.0)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for bound in (1.0, 0.5, 0.25):
    state.hyperparams["max_norm"] = jnp.asarray(bound)
    u, state = update(grads, state)
    np.testing.assert_allclose(optax.tree.norm(u), bound, rtol=1e-6)
    assert float(clipjax.clip_stats(state)["clip_by_global_norm/bound"]) == bound
  assert update._cache_size() == 1


@pytest.mark.parametrize("name", list(CLIPPERS))
def test_vmap_over_models_and_bounds_equals_separate_runs(name):
  n = 4
  params = jax.tree.map(lambda *xs: jnp.stack(xs), *[_params(i) for i in range(n)])
  grads = jax.tree.map(lambda *xs: jnp.stack(xs), *[_grads(10 + i) for i in range(n)])
  bounds = jnp.asarray([0.05, 0.5, 1.0, 50.0])

  def step(bound, p, g):
    tx = optax.chain(CLIPPERS[name](bound), optax.sgd(0.1))
    state = tx.init(p)
    u, state = tx.update(g, state, p)
    return optax.apply_updates(p, u), state

  new_params, states = jax.jit(jax.vmap(step))(bounds, params, grads)
  for i in range(n):
    one = jax.tree.map(lambda x, i=i: x[i], (params, grads))
    p_i, s_i = step(float(bounds[i]), *one)
    chex.assert_trees_all_close(
      jax.tree.map(lambda x, i=i: x[i], new_params), p_i, rtol=1e-6, atol=1e-7
    )
    chex.assert_trees_all_close(
      jax.tree.map(lambda x, i=i: x[i], clipjax.clip_stats(states)),
      clipjax.clip_stats(s_i),
      rtol=1e-6,
    )


def test_vmap_over_per_example_grads():
  grads = _grads()
  per_example = jax.tree.map(lambda x: jnp.stack([x, 0.01 * x, -x]), grads)
  tx = clipjax.clip_by_global_norm(1.0)
  u, stats = jax.vmap(lambda g: tx.update(g, None))(per_example)
  np.testing.assert_allclose(stats.norm[1], 0.01 * optax.tree.norm(grads), rtol=1e-5)
  norms = jax.vmap(optax.tree.norm)(u)
  np.testing.assert_allclose(norms, [1.0, stats.norm[1], 1.0], rtol=1e-5)


@pytest.mark.parametrize("name", list(CLIPPERS))
def test_sharded_arrays_keep_their_sharding(name):
  assert len(jax.devices()) == 8
  mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
  shardings = {
    "w": NamedSharding(mesh, P("data", "model")),
    "b": NamedSharding(mesh, P("model")),
  }
  params = jax.device_put(_params(), shardings)
  grads = jax.device_put(_grads(), shardings)
  tx = CLIPPERS[name](0.5)
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for key in ("w", "b"):
    assert u[key].sharding.is_equivalent_to(shardings[key], u[key].ndim)
  expected, _ = tx.update(_grads(), tx.init(_params()), _params())
  chex.assert_trees_all_close(u, expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", list(CLIPPERS))
def test_dtypes_are_kept_and_match_float32(name, dtype):
  params, grads = _params(dtype=dtype), _grads(dtype=dtype)
  tx = CLIPPERS[name](0.5)
  u, _state = jax.jit(tx.update)(grads, tx.init(params), params)
  chex.assert_trees_all_equal_dtypes(u, grads)
  p32, g32 = (jax.tree.map(lambda x: x.astype(jnp.float32), t) for t in (params, grads))
  ref, _ = tx.update(g32, tx.init(p32), p32)
  tol = {jnp.float16: 2e-3, jnp.bfloat16: 2e-2, jnp.float32: 1e-6}[dtype]
  chex.assert_trees_all_close(
    jax.tree.map(lambda x: x.astype(jnp.float32), u), ref, rtol=tol, atol=tol
  )


def test_mixed_float32_float64_tree():
  with jax.enable_x64(True):
    grads = {"a": jnp.asarray([3.0], jnp.float64), "b": jnp.asarray([4.0], jnp.float32)}
    u, stats = clipjax.clip_by_global_norm(1.0).update(grads, None)
    assert u["a"].dtype == jnp.float64 and u["b"].dtype == jnp.float32
    np.testing.assert_allclose(u["a"], [0.6]), np.testing.assert_allclose(u["b"], [0.8])
    assert stats.norm.dtype == jnp.float32


def test_meta_gradient_through_clipping_is_finite():
  def loss(bound, g):
    u, _ = clipjax.clip_by_global_norm(bound).update(g, None)
    return jnp.sum(u["w"])

  zeros = {"w": jnp.zeros(3)}
  assert np.isfinite(float(jax.grad(loss)(jnp.asarray(0.0), zeros)))
  grad = jax.grad(loss)(jnp.asarray(1.0), {"w": jnp.asarray([3.0, 4.0, 0.0])})
  np.testing.assert_allclose(float(grad), 7.0 / 5.0, rtol=1e-6)


@pytest.mark.usefixtures("standard_promotion")
def test_clip_stats_names_under_flax_nnx():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  tx = optax.chain(clipjax.clip_by_norm(0.5), optax.sgd(0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2)))))(model)
  optimizer.update(model, grads)
  stats = clipjax.clip_stats(optimizer.opt_state)
  assert set(stats) == {
    f"clip_by_norm/{field}/{leaf}"
    for field in ("norm", "scale", "bound")
    for leaf in ("bias", "kernel")
  } | {"clip_by_norm/clipped_fraction"}
  np.testing.assert_allclose(stats["clip_by_norm/norm/kernel"], np.sqrt(2), rtol=1e-6)

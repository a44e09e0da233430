"""Clipping inside shard_map: global norms over a mesh axis."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import clipjax


def _mesh():
  return Mesh(np.array(jax.devices()[:8]), ("data",))


def _tree(scale=1.0, dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.key(0))
  return {
    "w": (jax.random.normal(k1, (16, 5)) * scale).astype(dtype),
    "b": (jax.random.normal(k2, (8,)) * scale).astype(dtype),
  }


@pytest.mark.parametrize(
  "scale, dtype, bound",
  [
    (1.0, jnp.float32, 2.0),
    (1.0, jnp.float32, 100.0),
    (1e4, jnp.float16, 1.0),
    (0.0, jnp.float32, 0.0),
  ],
)
def test_global_norm_clip_of_a_sharded_tree_inside_shard_map(scale, dtype, bound):
  tree = _tree(scale, dtype)
  tx = clipjax.clip_by_global_norm(bound, axis_name="data")
  reference = clipjax.clip_by_global_norm(bound)
  expected, expected_state = reference.update(tree, reference.init(tree))

  @jax.jit
  @jax.shard_map(mesh=_mesh(), in_specs=P("data"), out_specs=(P("data"), P()))
  def clip_shards(local):
    updates, state = tx.update(local, tx.init(local))
    return updates, state.norm

  updates, norm = clip_shards(tree)
  assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
  assert np.isfinite(float(norm))
  np.testing.assert_allclose(norm, expected_state.norm, rtol=1e-5)
  chex.assert_trees_all_close(
    updates, expected, rtol=2e-3 if dtype == jnp.float16 else 1e-6
  )


def test_without_axis_name_each_shard_is_clipped_alone():
  """The documented difference: per-device norms unless axis_name is given."""
  tree = {"w": jnp.ones((8, 4))}

  @jax.jit
  @jax.shard_map(mesh=_mesh(), in_specs=P("data"), out_specs=P("data"))
  def local_norms(local):
    return clipjax.global_norm(local)[None]

  @jax.jit
  @jax.shard_map(mesh=_mesh(), in_specs=P("data"), out_specs=P())
  def total_norm(local):
    return clipjax.global_norm(local, axis_name="data")

  np.testing.assert_allclose(total_norm(tree), np.sqrt(32.0), rtol=1e-6)
  np.testing.assert_allclose(local_norms(tree), np.full(8, 2.0), rtol=1e-6)


def test_clippers_keep_the_input_sharding_under_jit():
  mesh = _mesh()
  tree = _tree()
  sharded = jax.device_put(tree, NamedSharding(mesh, P("data")))
  for tx in (clipjax.clip_by_global_norm(1.0), clipjax.clip_by_norm(0.5)):
    expected, _ = tx.update(tree, tx.init(tree))
    updates, _ = jax.jit(tx.update)(sharded, tx.init(sharded))
    chex.assert_trees_all_close(updates, expected, rtol=1e-6)
    for u, s in zip(jax.tree.leaves(updates), jax.tree.leaves(sharded), strict=True):
      assert u.sharding.is_equivalent_to(s.sharding, u.ndim)


def _mixed_tree():
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  return {
    "w": jax.random.normal(k1, (8, 8)),  # sharded over the axis
    "b": jnp.ones((3,)) * 2.0,  # replicated
    "scale": jax.random.normal(k2, (5,)),  # replicated
    "proj": jax.random.normal(k3, (16, 4)),  # sharded
  }


MIXED_SPECS = {"w": P("data"), "b": P(), "scale": P(), "proj": P("data")}


@pytest.mark.parametrize("bound", [1.0, 1e3])
def test_a_tree_of_sharded_and_replicated_leaves_has_the_unsharded_norm(bound):
  """Each replicated leaf counts once, not once per device (issue 12/13)."""
  tree = _mixed_tree()
  flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in tree.values()])
  expected_norm = np.linalg.norm(flat)
  tx = clipjax.clip_by_global_norm(bound, axis_name="data")

  @jax.jit
  @jax.shard_map(
    mesh=_mesh(), in_specs=(MIXED_SPECS,), out_specs=(MIXED_SPECS, P(), P())
  )
  def clip_shards(local):
    updates, state = tx.update(local, tx.init(local))
    return updates, state.norm, clipjax.global_norm(local, axis_name="data")

  updates, norm, norm2 = clip_shards(tree)
  np.testing.assert_allclose(norm, expected_norm, rtol=1e-6)
  np.testing.assert_allclose(norm2, expected_norm, rtol=1e-6)
  scale = min(1.0, bound / expected_norm)
  for k, x in tree.items():
    np.testing.assert_allclose(updates[k], np.asarray(x) * scale, rtol=1e-5)
  # The same tree, unsharded, under jax.jit.
  np.testing.assert_allclose(
    jax.jit(clipjax.global_norm)(tree), expected_norm, rtol=1e-6
  )


def test_a_tree_that_varies_over_nothing_is_an_already_summed_gradient():
  tx = clipjax.clip_by_global_norm(1.0, axis_name="data")

  @jax.jit
  @jax.shard_map(mesh=_mesh(), in_specs=(P(), P("data")), out_specs=P())
  def norm_of_grad(params, x):
    grads = jax.grad(lambda p: jnp.sum(x * p["w"]))(params)
    return tx.update(grads, tx.init(grads))[1].norm

  params = {"w": jnp.ones(())}
  with pytest.raises(ValueError, match=r"clip_by_global_norm.*\['w'\].*pcast"):
    norm_of_grad(params, jnp.ones(8))
  with pytest.raises(ValueError, match=r"global_norm\(axis_name='data'\)"):
    jax.jit(
      jax.shard_map(
        lambda t: clipjax.global_norm(t, axis_name="data"),
        mesh=_mesh(),
        in_specs=P(),
        out_specs=P(),
      )
    )(params)


def test_with_check_vma_off_every_leaf_is_taken_as_sharded():
  """The documented fallback where JAX records no varying axes."""
  tree = {"w": jnp.ones((8, 2)), "b": jnp.ones((3,))}

  @jax.jit
  @jax.shard_map(
    mesh=_mesh(),
    in_specs=({"w": P("data"), "b": P()},),
    out_specs=P(),
    check_vma=False,
  )
  def norm(t):
    return clipjax.global_norm(t, axis_name="data")

  # 16 ones sharded, 3 replicated ones summed over 8 devices: sqrt(16 + 24).
  np.testing.assert_allclose(norm(tree), np.sqrt(40.0), rtol=1e-6)

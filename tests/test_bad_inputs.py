"""Careless inputs that used to pass construction: each now gets a clear error
naming the call, the argument and the value, or optax's result where optax
accepts the input (README, "Bad inputs and what they get")."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import clipjax
from clipjax import compression, distributed

G = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])}


def _loss(params, x):
  return (x @ params["w"]) ** 2


# --- bounds that are not one number -------------------------------------------


def test_a_tuple_of_global_bounds_is_an_error_not_a_strange_clip():
  with pytest.raises(
    ValueError,
    match=(
      r"clip_by_global_norm\(max_norm=\(1\.0, 2\.0\)\) must be a scalar; got shape"
      r" \(2,\)\. .*clip_by_group_norm.*jax\.vmap"
    ),
  ):
    clipjax.clip_by_global_norm((1.0, 2.0))


def test_a_one_element_list_is_not_a_global_bound():
  with pytest.raises(
    ValueError,
    match=r"clip_by_global_norm\(max_norm=\[1\.0\]\) must be a scalar; got shape"
    r" \(1,\)",
  ):
    clipjax.clip_by_global_norm([1.0])


# Every clipper whose bound is one scalar, given a list of two.
SCALAR_BOUNDS = {
  "clip_by_global_norm/eps": lambda b: clipjax.clip_by_global_norm(1.0, eps=b),
  "clip_by_norm/max_norm": clipjax.clip_by_norm,
  "clip_by_block_rms/threshold": clipjax.clip_by_block_rms,
  "clip_by_group_norm/max_norm": lambda b: clipjax.clip_by_group_norm(b, "all"),
  "adaptive_grad_clip/clipping": clipjax.adaptive_grad_clip,
  "autoclip/percentile": clipjax.autoclip,
  "zclip/alpha": clipjax.zclip,
  "zclip/z_thresh": lambda b: clipjax.zclip(z_thresh=b),
  "zclip/max_norm": lambda b: clipjax.zclip(max_norm=b),
  "adagc/relative": clipjax.adagc,
  "adagc/warmup_max_norm": lambda b: clipjax.adagc(warmup_max_norm=b),
  "quantile_clip/initial_max_norm": lambda b: clipjax.quantile_clip(initial_max_norm=b),
  "clippy/relative": clipjax.clippy,
  "spam_clip/threshold": clipjax.spam_clip,
  "skip_and_clip/max_norm": lambda b: clipjax.skip_and_clip(b, math.inf),
  "skip_and_clip/drop_norm": lambda b: clipjax.skip_and_clip(0.1, b),
  "per_example_global_norm_clip/l2_norm_clip": lambda b: (
    clipjax.per_example_global_norm_clip({"w": jnp.ones((2, 3))}, b)
  ),
  "per_example_clipped_grad/l2_clip": lambda b: clipjax.per_example_clipped_grad(
    _loss, l2_clip=jnp.asarray(b)
  ),
}


@pytest.mark.parametrize("name", list(SCALAR_BOUNDS))
def test_every_scalar_bound_rejects_an_array(name):
  call, arg = name.split("/")
  with pytest.raises(
    ValueError, match=rf"^{call}\({arg}=.*\) must be a scalar; got shape \(2,\)"
  ):
    SCALAR_BOUNDS[name]([0.5, 0.5])


@pytest.mark.parametrize(
  "make,match",
  [
    (
      lambda: clipjax.clip_by_global_norm("1.0"),
      r"clip_by_global_norm\(max_norm='1\.0'\) must be a number, not a str",
    ),
    (
      lambda: clipjax.per_example_clipped_grad(_loss, l2_clip="1.0"),
      r"per_example_clipped_grad\(l2_clip='1\.0'\) must be a number, not a str",
    ),
    (
      lambda: clipjax.per_example_clipped_grad(_loss, l2_clip={"w": "1.0"}),
      r"per_example_clipped_grad\(l2_clip\['w'\]='1\.0'\) must be a number",
    ),
    (
      lambda: clipjax.per_example_clipped_grad(_loss, l2_clip={"w": jnp.ones(2)}),
      r"per_example_clipped_grad\(l2_clip\['w'\]=.*\) must be a scalar.*one scalar"
      r" bound per leaf or per group",
    ),
    (
      lambda: clipjax.clip_by_norm(True),
      r"clip_by_norm\(max_norm=True\) must be a number, not a bool",
    ),
    (
      lambda: clipjax.clip_by_global_norm(None),
      r"clip_by_global_norm\(max_norm=None\) must be a number, not a NoneType",
    ),
    (
      lambda: clipjax.clip_by_global_norm(jnp.array(True)),
      r"clip_by_global_norm\(max_norm=Array\(True.*must be a real number; got dtype"
      r" bool",
    ),
    (
      lambda: clipjax.clip("0.1"),
      r"clip\(max_delta='0\.1'\) must be a number, not a str",
    ),
    (
      lambda: clipjax.zclip(alpha="0.9"),
      r"zclip\(alpha='0\.9'\) must be a number, not a str",
    ),
    (
      lambda: clipjax.autoclip("10"),
      r"autoclip\(percentile='10'\) must be a number, not a str",
    ),
    (
      lambda: clipjax.clip_by_group_norm({"a": "1.0"}, {"w": "a"}),
      r"clip_by_group_norm\(max_norm\['a'\]='1\.0'\) must be a number",
    ),
  ],
)
def test_strings_bools_and_none_are_not_bounds(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_per_leaf_bounds_where_they_are_meant_still_work():
  params = {"w": jnp.ones(3)}
  x = jnp.eye(3) * jnp.array([1.0, 2.0, 10.0])
  per_leaf = clipjax.per_example_clipped_grad(_loss, l2_clip={"w": 1.0})
  one = clipjax.per_example_clipped_grad(_loss, l2_clip=1.0)
  chex.assert_trees_all_close(per_leaf(params, x)[0], one(params, x)[0])
  tx = clipjax.clip_by_group_norm({"a": 1.0}, {"w": "a", "b": "a"})
  chex.assert_trees_all_close(
    tx.update(G, None)[0], clipjax.clip_by_global_norm(1.0).update(G, None)[0]
  )


# --- traced bounds with a batch dimension ----------------------------------------


@pytest.mark.parametrize(
  "make",
  [
    clipjax.clip_by_global_norm,
    clipjax.clip_by_norm,
    lambda c: clipjax.zclip(max_norm=c),
    lambda c: clipjax.skip_and_clip(c, math.inf),
  ],
)
def test_a_batch_of_traced_bounds_inside_jit_says_scalar_and_vmap(make):
  def step(c, g):
    tx = make(c)
    return tx.update(g, tx.init(g))[0]

  with pytest.raises(
    ValueError,
    match=r"\(max_norm=<traced float32\[3\]>\) must be a scalar; got shape \(3,\)\..*"
    r"jax\.vmap",
  ):
    jax.jit(step)(jnp.ones(3), G)
  # What the message points to: one scalar bound per vmapped call.
  bounds = jnp.array([0.5, 1.0, 10.0])
  many = jax.jit(jax.vmap(step, in_axes=(0, None)))(bounds, G)
  for i, c in enumerate(bounds):
    chex.assert_trees_all_close(
      jax.tree.map(lambda x, i=i: x[i], many), step(c, G), rtol=1e-6
    )


# --- clip's element-wise array bounds, as optax.clip ------------------------------


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("stats", [True, False])
def test_clip_with_an_array_bound_is_optax_clip(jit, stats):
  delta = [0.1, 0.2]
  g = {"m": jnp.array([[3.0, -0.1], [-0.05, 4.0]]), "v": jnp.array([0.05, -9.0])}
  tx = clipjax.clip(delta, stats=stats)
  update = jax.jit(tx.update) if jit else tx.update
  u, s = update(g, tx.init(g))
  expected = optax.clip(jnp.asarray(delta)).update(g, None)[0]
  chex.assert_trees_all_equal(u, expected)
  if stats:
    np.testing.assert_allclose(s.norm["m"], 4.0)
    # The smallest factor an element was multiplied by, against numpy.
    factors = np.minimum(1.0, np.asarray(delta) / np.abs(np.asarray(g["m"])))
    np.testing.assert_allclose(s.scale["m"], factors.min(), rtol=1e-6)
    np.testing.assert_allclose(s.scale["v"], 0.2 / 9.0, rtol=1e-6)
    np.testing.assert_allclose(s.bound, delta)
    np.testing.assert_allclose(s.clipped_fraction, 3 / 6)


@pytest.mark.parametrize("jit", [False, True])
def test_clip_with_an_array_bound_that_would_reshape_a_leaf_names_it(jit):
  tx = clipjax.clip([0.1, 0.2])
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(
    ValueError,
    match=r"clip\(max_delta=\[0\.1, 0\.2\]\): an array max_delta \(shape \(2,\)\)"
    r" bounds elements .*leaf \['b'\] has shape \(1,\)",
  ):
    update(G, None)


def test_clip_with_a_negative_array_bound_is_an_error():
  with pytest.raises(ValueError, match=r"clip\(max_delta=\[0\.1, -1\.0\]\) must be"):
    clipjax.clip([0.1, -1.0])


# --- skip_and_clip's two bounds ---------------------------------------------------


def test_skip_and_clip_rejects_a_drop_bound_below_the_clip_bound():
  with pytest.raises(
    ValueError,
    match=r"skip_and_clip\(max_norm=10\.0, drop_norm=1\.0\): drop_norm must be >="
    r" max_norm",
  ):
    clipjax.skip_and_clip(10.0, 1.0)
  # Only skipping (max_norm=inf) and equal bounds stay valid.
  clipjax.skip_and_clip(math.inf, 1.0)
  clipjax.skip_and_clip(1.0, 1.0)


# --- a state made for another tree ------------------------------------------------

ONE = {"w": jnp.ones((3, 4))}
RESHAPED = {"w": jnp.ones((3, 5))}
RENAMED = {"v": jnp.ones((3, 4))}

STATEFUL = {
  "compress": lambda: compression.compress(compression.top_k(0.5)),
  "compress(ef21)": lambda: compression.compress(
    compression.top_k(0.5), feedback="ef21"
  ),
  "compress(powersgd)": lambda: compression.compress(compression.powersgd(1)),
  "dgc": lambda: compression.dgc(0.5),
  "zclip": clipjax.zclip,
  "autoclip": clipjax.autoclip,
  "quantile_clip": clipjax.quantile_clip,
  "adagc": clipjax.adagc,
  "spam_clip": clipjax.spam_clip,
}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", list(STATEFUL))
def test_a_state_made_for_other_shapes_names_the_call_and_the_leaf(name, jit):
  tx = STATEFUL[name]()
  call = name.split("(")[0]
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(ONE)
  update(ONE, state)  # the tree it was made for
  in_state = r"\(3, 4\) in the state"
  if name == "dgc":  # its momentum and velocity
    in_state = r"\[\(3, 4\), \(3, 4\)\] in the state"
  if name != "adagc":  # one scalar per leaf: only the structure can differ
    with pytest.raises(
      ValueError,
      match=rf"^{call}: the state does not fit the updates at leaf \['w'\]: shape"
      rf" \(3, 5\) in the updates, {in_state}",
    ):
      update(RESHAPED, state)
  with pytest.raises(
    ValueError,
    match=rf"^{call}: the state does not fit the updates at leaf \['v'\]: shape"
    r" \(3, 4\) in the updates, no such leaf in the state",
  ):
    update(RENAMED, state)


def test_dgc_names_both_of_its_per_leaf_arrays():
  tx = compression.dgc(0.5)
  with pytest.raises(
    ValueError,
    match=r"dgc: .* at leaf \['w'\]: shape \(3, 5\) in the updates, \[\(3, 4\),"
    r" \(3, 4\)\] in the state where \[\(3, 5\), \(3, 5\)\] fits",
  ):
    tx.update(RESHAPED, tx.init(ONE))


def test_compressed_mean_names_the_leaf_under_shard_map():
  tx = distributed.compressed_mean(compression.top_k(0.5), "data")
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=P("data"), out_specs=P("data"))
  def run(g):
    g = g[0]
    u, _ = tx.update(g, tx.init(jnp.zeros((5,))))
    return u[None]

  grads = jax.random.normal(jax.random.key(0), (8, 6))
  with pytest.raises(
    ValueError,
    match=r"compressed_mean: the state does not fit the updates at its only leaf"
    r" \(the updates are one array\): shape \(6,\) in the updates, \(5,\) in the"
    r" state",
  ):
    run(grads)


@pytest.mark.parametrize("name", ["zclip", "autoclip", "quantile_clip"])
def test_tree_agnostic_states_still_vmap_and_accept_hand_built_states(name):
  tx = STATEFUL[name]()
  grads = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), ONE)
  states = jax.vmap(tx.init)(grads)
  u, _ = jax.jit(jax.vmap(tx.update))(grads, states)
  alone, _ = tx.update(jax.tree.map(lambda x: 2 * x, ONE), tx.init(ONE))
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[1], u), alone)
  # A state built by hand records no tree and is not checked.
  state = tx.init(ONE)
  bare = type(state)(*state[:-1])
  tx.update(RENAMED, bare)


# --- what zclip logs while it is not clipping --------------------------------------


def test_zclip_logs_the_bound_in_force_when_not_clipping():
  tx = clipjax.zclip(warmup_steps=2)
  capped = clipjax.zclip(warmup_steps=2, max_norm=5.0)
  state, capped_state = tx.init(ONE), capped.init(ONE)
  bounds, capped_bounds = [], []
  for g in (1.0, 1.2, 1.1):  # warm-up, warm-up, no spike
    grads = {"w": jnp.full((3, 4), g / np.sqrt(12.0))}
    _, state = tx.update(grads, state)
    _, capped_state = capped.update(grads, capped_state)
    bounds.append(float(state.stats.bound))
    capped_bounds.append(float(capped_state.stats.bound))
  assert bounds[:2] == [math.inf, math.inf]  # nothing bounds the warm-up
  assert capped_bounds[:2] == [5.0, 5.0]
  # After warm-up (mean 1.1, std 0.1): the norm above which it would clip.
  np.testing.assert_allclose(bounds[2], 1.1 + 2.5 * (0.1 + 1e-6), rtol=1e-5)
  np.testing.assert_allclose(capped_bounds[2], bounds[2], rtol=1e-6)
  assert float(state.stats.scale) == 1.0


# --- clip_stats of a tree without clipper state -----------------------------------


def test_clip_stats_of_an_optimizer_without_clippers_is_empty():
  assert clipjax.clip_stats(optax.adam(1e-3).init(ONE)) == {}
  assert clipjax.clip_stats(clipjax.clip(1.0, stats=False).init(ONE)) == {}


def test_clip_stats_of_a_checkpoint_restored_without_a_target_says_so(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = optax.chain(clipjax.zclip(warmup_steps=2), optax.sgd(0.1))
  _, state = tx.update(ONE, tx.init(ONE))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  plain = checkpointer.restore(tmp_path / "state")
  with pytest.raises(
    ValueError,
    match=r"clip_stats: the state holds no ClipStats, but \[0\]\['stats'\] is a"
    r" plain dict with their fields .*restored without a target.*jax\.eval_shape",
  ):
    clipjax.clip_stats(plain)
  # Restored into the state tree, as the message says: the stats and the tree.
  target = jax.eval_shape(tx.init, ONE)
  restored = checkpointer.restore(tmp_path / "state", target)
  chex.assert_trees_all_equal(clipjax.clip_stats(restored), clipjax.clip_stats(state))
  with pytest.raises(ValueError, match=r"zclip: .* at leaf \['v'\]"):
    tx.update(RENAMED, restored)

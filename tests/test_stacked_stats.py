"""Per-leaf statistics stacked by block shape (issue 13): counted, and read back.

The per-leaf clippers keep one vector per shape of block, not one array per
leaf; these tests count the state arrays on GPT-2-like trees of 148 and 436
leaves, bound the optimized program against optax's, and check that the
stacked statistics read back exactly as the per-leaf values they replace
(``stats.norm["w"]``, ``clip_stats`` names, under ``jax.vmap``), against numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_leaf_count_cost import LARGE, SMALL, hlo_instructions

import clipjax

PER_LEAF = {
  "clip": lambda: clipjax.clip(0.1),
  "clip_by_norm": lambda: clipjax.clip_by_norm(1.0),
  "clip_by_norm_axis": lambda: clipjax.clip_by_norm(1.0, axis=lambda x: x.ndim - 1),
  "clip_by_block_rms": lambda: clipjax.clip_by_block_rms(0.1),
  "adaptive_grad_clip": lambda: clipjax.adaptive_grad_clip(0.1),
  "clip_by_group_norm": lambda: clipjax.clip_by_group_norm(
    1.0, lambda t: jax.tree.map(lambda x: x.ndim, t)
  ),
}


@pytest.mark.parametrize("name", sorted(PER_LEAF))
def test_per_leaf_clippers_state_does_not_grow_with_the_leaves(name):
  make = PER_LEAF[name]
  small = len(jax.tree.leaves(make().init(SMALL)))
  large = len(jax.tree.leaves(make().init(LARGE)))
  # One array per field and shape of block: per-leaf norms are one vector,
  # AGC's per-unit norms one array per unit shape (four here).
  assert small == large <= 16, (small, large)


@pytest.mark.parametrize(
  "ours, theirs",
  [
    (lambda: clipjax.clip_by_block_rms(0.1), lambda: optax.clip_by_block_rms(0.1)),
    (
      lambda: clipjax.adaptive_grad_clip(0.1),
      lambda: optax.adaptive_grad_clip(0.1),
    ),
  ],
  ids=["clip_by_block_rms", "adaptive_grad_clip"],
)
def test_per_leaf_drop_ins_program_is_bounded_by_optaxs(ours, theirs):
  # The issue's goal is 1.5x; what holds today (2.3x: the statistics and the
  # overflow branch, which optax has not) is guarded here against growth.
  a = hlo_instructions(optax.chain(ours(), optax.sgd(0.1)), SMALL)
  b = hlo_instructions(optax.chain(theirs(), optax.sgd(0.1)), SMALL)
  assert a <= 2.5 * b, (a, b)


def test_clip_program_is_within_the_issues_bound_of_optaxs():
  # The statistics' reductions run once per group of small leaves of one
  # shape (peaks_and_counts), not once per leaf: 1.25x optax.clip's program
  # on this tree, where per-leaf reductions made it 4.1x.
  a = hlo_instructions(optax.chain(clipjax.clip(0.1), optax.sgd(0.1)), SMALL)
  b = hlo_instructions(optax.chain(optax.clip(0.1), optax.sgd(0.1)), SMALL)
  assert a <= 1.5 * b, (a, b)


def _tree(rng):
  return {
    "dense": {"kernel": rng.standard_normal((4, 3)), "bias": rng.standard_normal(3)},
    "emb": rng.standard_normal((5, 3)),
    "scale": rng.standard_normal(3),
    "empty": np.zeros((0, 3)),
  }


def test_stacked_statistics_read_back_as_per_leaf_values():
  rng = np.random.default_rng(0)
  g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _tree(rng))
  w = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _tree(rng))
  _, s = jax.jit(clipjax.clip_by_norm(1.0).update)(g, None)
  for path, x in jax.tree_util.tree_flatten_with_path(g)[0]:
    norm = np.linalg.norm(np.asarray(x, np.float64))
    leaf = s.norm.tree()
    for k in path:
      leaf = leaf[k.key]
    np.testing.assert_allclose(leaf, norm, rtol=1e-6)
  assert float(s.scale["emb"]) == pytest.approx(
    min(1.0, 1.0 / np.linalg.norm(g["emb"]))
  )
  # AGC: per-unit norms of the params give the bounds (axis 0 of a kernel).
  _, s = clipjax.adaptive_grad_clip(0.1).update(g, None, w)
  units = np.linalg.norm(np.asarray(w["dense"]["kernel"], np.float64), axis=0)
  np.testing.assert_allclose(
    s.bound["dense"]["kernel"], 0.1 * np.maximum(units, 1e-3), rtol=1e-6
  )
  assert s.norm["empty"].shape == (3,)  # units of an empty (0, 3) kernel
  names = set(clipjax.clip_stats(s))
  assert "adaptive_grad_clip/norm/dense/kernel" in names
  assert "adaptive_grad_clip/bound/emb" in names


def test_stacked_statistics_of_a_vmapped_stack_of_models():
  rng = np.random.default_rng(1)
  g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _tree(rng))
  stack = jax.tree.map(lambda x: jnp.stack([x, 2 * x, 3 * x]), g)
  _, s = jax.vmap(lambda u: clipjax.clip_by_block_rms(0.1).update(u, None))(stack)
  rms = np.sqrt(np.mean(np.square(np.asarray(g["emb"], np.float64))))
  np.testing.assert_allclose(s.norm["emb"], [rms, 2 * rms, 3 * rms], rtol=1e-6)
  assert clipjax.clip_stats(s)["clip_by_block_rms/norm/scale"].shape == (3,)


@pytest.mark.parametrize("bound", [0.5, [0.5, 1.0, 2.0]], ids=["scalar", "array"])
def test_clip_statistics_of_stacked_small_leaves_equal_numpy(bound):
  # Small leaves of one shape and dtype share one reduction (three (4, 3)
  # leaves in float32, two in bfloat16); a leaf over SMALL_LEAF elements and
  # an empty one take their own. Each leaf's peak, smallest factor and the
  # fraction clipped are its own, as numpy computes them.
  rng = np.random.default_rng(3)
  f32 = lambda *s: jnp.asarray(rng.standard_normal(s) * 2, jnp.float32)
  g = {
    "a": f32(4, 3),
    "b": f32(4, 3),
    "c": f32(4, 3) * 0.01,
    "h1": f32(4, 3).astype(jnp.bfloat16),
    "h2": f32(4, 3).astype(jnp.bfloat16),
    "big": f32(30_000, 3),
    "empty": jnp.zeros((0, 3), jnp.float32),
  }
  u, s = jax.jit(clipjax.clip(bound).update)(g, None)
  d = np.broadcast_to(np.asarray(bound, np.float64), (3,))
  clipped, total = 0, 0
  for name, x in g.items():
    x64 = np.abs(np.asarray(x.astype(jnp.float32), np.float64))
    peak = x64.max(initial=0.0)
    factor = np.where(x64 > d, d / np.where(x64 > d, x64, 1.0), 1.0).min(initial=1.0)
    assert float(s.norm[name]) == pytest.approx(peak, rel=1e-6), name
    assert float(s.scale[name]) == pytest.approx(factor, rel=1e-6), name
    np.testing.assert_array_equal(
      np.asarray(u[name], np.float32),
      np.asarray(jnp.clip(x, -jnp.asarray(d, x.dtype), jnp.asarray(d, x.dtype))),
    )
    clipped += int((x64 > d).sum())
    total += x64.size
  assert float(s.clipped_fraction) == pytest.approx(clipped / total, rel=1e-6)

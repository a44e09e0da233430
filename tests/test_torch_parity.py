"""Parity with PyTorch's clipping utilities.

``clip_by_global_norm(c, eps=1e-6)`` against ``torch.nn.utils.clip_grad_norm_``
and ``clip(c)`` against ``torch.nn.utils.clip_grad_value_``, on the same
float32 gradients drawn with numpy.

torch comes with the ``compare`` extra. Without it these tests are skipped,
except under ``CLIPJAX_REQUIRE_COMPARE=1`` (the README's second test command,
run by CI), where a missing torch, Opacus or jax_privacy fails instead.
"""

import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clipjax

REQUIRE_COMPARE = os.environ.get("CLIPJAX_REQUIRE_COMPARE") == "1"
# The libraries of the compare extra that the suite's comparisons use (here,
# and as rows of tests/test_per_example_benchmark.py).
COMPARE_MODULES = ("torch", "opacus", "jax_privacy")

if REQUIRE_COMPARE:
  import torch  # an ImportError here fails the run
else:
  torch = pytest.importorskip("torch")


def test_compare_extra_is_installed_when_required():
  if not REQUIRE_COMPARE:
    pytest.skip("CLIPJAX_REQUIRE_COMPARE is not 1")
  missing = []
  for name in COMPARE_MODULES:
    try:
      importlib.import_module(name)
    except ImportError:
      missing.append(name)
  assert not missing, f"the compare extra is incomplete: {missing} do not import"


SHAPES = [(4, 3), (3,), (3, 3, 2, 4), (2, 3, 5), ()]


def _grads(seed: int, scale: float, shapes=SHAPES) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [np.asarray(scale * rng.standard_normal(s), np.float32) for s in shapes]


def _np_norm(grads: list[np.ndarray]) -> float:
  return float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads)))


def _torch_params(grads: list[np.ndarray]) -> list:
  params = []
  for g in grads:
    p = torch.zeros(g.shape, dtype=torch.float32, requires_grad=True)
    p.grad = torch.from_numpy(g.copy())
    params.append(p)
  return params


def _jax_update(tx, grads: list[np.ndarray], jit: bool):
  tree = {f"g{i}": jnp.asarray(g) for i, g in enumerate(grads)}
  update = jax.jit(tx.update) if jit else tx.update
  new, state = update(tree, tx.init(tree))
  return [np.asarray(new[f"g{i}"]) for i in range(len(grads))], state


def _check_global_norm(grads: list[np.ndarray], max_norm: float, jit: bool):
  params = _torch_params(grads)
  torch_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
  ours, state = _jax_update(clipjax.clip_by_global_norm(max_norm, eps=1e-6), grads, jit)
  for mine, p in zip(ours, params, strict=True):
    assert mine.dtype == np.float32
    np.testing.assert_allclose(mine, p.grad.numpy(), rtol=2e-6, atol=1e-9)
  np.testing.assert_allclose(float(state.norm), float(torch_norm), rtol=2e-6)


# Multipliers of max_norm for the tree's norm: 0 is an all-zero tree.
NORM_RATIOS = [0.0, 1e-3, 0.5, 0.999, 1.001, 2.0, 1e4]


@pytest.mark.parametrize("ratio", NORM_RATIOS)
@pytest.mark.parametrize("max_norm", [0.1, 1.0, 50.0])
@pytest.mark.parametrize("jit", [False, True])
def test_clip_by_global_norm_matches_clip_grad_norm(ratio, max_norm, jit):
  raw = _grads(seed=int(ratio * 1000) % 97, scale=1.0)
  target = ratio * max_norm
  grads = [np.asarray(g * np.float32(target / _np_norm(raw)), np.float32) for g in raw]
  expected_norm = _np_norm(grads)
  assert (expected_norm < max_norm) == (ratio < 1)  # the case is what it says
  _check_global_norm(grads, max_norm, jit)


@pytest.mark.parametrize("jit", [False, True])
def test_clip_by_global_norm_zero_tree_and_zero_bound(jit):
  zeros = [np.zeros(s, np.float32) for s in SHAPES]
  _check_global_norm(zeros, 1.0, jit)
  _check_global_norm(zeros, 0.0, jit)
  _check_global_norm(_grads(3, 1.0), 0.0, jit)


@pytest.mark.parametrize("jit", [False, True])
def test_clip_by_global_norm_single_tensor(jit):
  _check_global_norm(_grads(5, 10.0, shapes=[(7, 11)]), 1.0, jit)


@settings(max_examples=25, deadline=None)
@given(
  seed=st.integers(0, 2**32 - 1),
  log_scale=st.floats(-4, 4),
  max_norm=st.floats(1e-3, 1e3),
  n_leaves=st.integers(1, 6),
)
def test_clip_by_global_norm_matches_on_random_trees(
  seed, log_scale, max_norm, n_leaves
):
  rng = np.random.default_rng(seed)
  shapes = [tuple(rng.integers(1, 6, size=rng.integers(0, 4))) for _ in range(n_leaves)]
  grads = _grads(seed, 10.0**log_scale, shapes)
  _check_global_norm(grads, max_norm, jit=False)


@pytest.mark.parametrize("max_delta", [0.0, 0.05, 0.5, 1.0, 100.0])
@pytest.mark.parametrize("jit", [False, True])
def test_clip_matches_clip_grad_value(max_delta, jit):
  grads = _grads(seed=11, scale=1.0)
  params = _torch_params(grads)
  torch.nn.utils.clip_grad_value_(params, max_delta)
  ours, state = _jax_update(clipjax.clip(max_delta), grads, jit)
  for mine, p in zip(ours, params, strict=True):
    assert mine.dtype == np.float32
    # A clamp does no arithmetic: both sides must agree bit for bit.
    np.testing.assert_array_equal(mine, p.grad.numpy())
  flat = np.concatenate([g.ravel() for g in grads])
  np.testing.assert_allclose(
    float(state.clipped_fraction), np.mean(np.abs(flat) > max_delta), rtol=1e-6
  )

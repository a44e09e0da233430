"""``examples/dp_digits.py``: its run gives the README's table; its batches are right.

The README's run (the defaults, 30 epochs) takes about as long as the quick one
(compilation dominates), so it goes in a subprocess, as a user would run it,
and its printed table is checked against the README's claims: DP-SGD above a
stated accuracy floor and below non-private SGD, at the epsilon the accountant
gives. The Poisson batches and the masked padding, on which the printed
epsilon rests, are checked directly.
"""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipjax
from clipjax import privacy

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dp_digits():
  pytest.importorskip("flax")
  pytest.importorskip("sklearn")
  pytest.importorskip("dp_accounting")
  spec = importlib.util.spec_from_file_location(
    "_example_dp_digits", ROOT / "examples" / "dp_digits.py"
  )
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, str(ROOT / "examples"))  # as when run as a script
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(ROOT / "examples"))
  return module


# What the README's table says of the default run (delta=1e-5, epsilon 4.26
# for both models): non-private SGD 0.972 and DP-SGD (z=1.5, C=1) 0.950 for the
# MLP; 0.969 and 0.931 for the CNN.
FLOORS = {"MLP": (0.95, 0.93), "CNN": (0.95, 0.91)}  # (non-private, DP-SGD)


def _table(stdout: str) -> dict[tuple[str, str], list[str]]:
  """``(model kind, training) -> cells`` of the printed table."""
  rows = {}
  for line in stdout.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("| ") and cells[0] != "model":
      rows[cells[0].split(" ")[0], cells[1].split(" (")[0]] = cells[2:]
  return rows


def test_default_run_reaches_the_readme_accuracy_at_its_epsilon(dp_digits):
  done = subprocess.run(
    [sys.executable, str(ROOT / "examples" / "dp_digits.py")],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  assert done.returncode == 0, done.stderr[-4000:]
  rows = _table(done.stdout)
  assert set(rows) == {(m, t) for m in FLOORS for t in ("non-private SGD", "DP-SGD")}, (
    done.stdout
  )
  # 30 epochs of 1437 examples at expected batch 64, noise multiplier 1.5.
  steps = round(30 * 1437 / 64)
  assert f"{steps} steps" in done.stdout
  eps = privacy.epsilon(1.5, 64 / 1437, steps, 1e-5)
  assert round(eps, 2) == 4.26  # the README's epsilon
  for model, (plain_floor, dp_floor) in FLOORS.items():
    plain, dp = rows[model, "non-private SGD"], rows[model, "DP-SGD"]
    assert plain[1] == "inf"
    assert float(plain[0]) >= plain_floor, done.stdout
    # Privacy costs accuracy, but not much on this task.
    assert dp_floor <= float(dp[0]) < float(plain[0]), done.stdout
    assert float(dp[1]) == pytest.approx(eps, abs=0.005)


def test_the_cnn_takes_the_ghost_path_through_its_convolutions(dp_digits):
  from flax import nnx

  x_train, y_train, _, _ = dp_digits.load_split()
  model = dp_digits.CNN(8, nnx.Rngs(0))
  f = clipjax.per_example_clipped_grad(dp_digits.per_example_loss, l2_clip=1.0)
  x, y = jnp.asarray(x_train[:8]), jnp.asarray(y_train[:8])
  plan = f.plan(model, x, y, jnp.ones(8))
  assert plan["['conv1']['kernel'].value"] == "ghost: conv (explicit)", plan
  assert not any(v.startswith("vmap") for v in plan.values()), plan


def test_poisson_batches_pad_with_masked_rows(dp_digits):
  rng = np.random.default_rng(0)
  n, q, steps = 1000, 0.05, 400
  indices, mask = dp_digits.poisson_batches(n, q, steps, rng)
  sizes = mask.sum(axis=1)
  assert indices.shape == mask.shape == (steps, int(sizes.max()))
  # Binomial(n, q) batch sizes: mean n q, variance n q (1 - q).
  assert abs(sizes.mean() - n * q) < 5 * math.sqrt(n * q * (1 - q) / steps)
  assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.25)
  for idx, m in zip(indices, mask, strict=True):
    real = idx[m == 1]
    assert len(set(real.tolist())) == len(real)  # no example twice in a batch
    assert np.all(idx[m == 0] == 0)
  # Every example is drawn about q * steps times.
  counts = np.bincount(indices[mask == 1], minlength=n)
  assert abs(counts.mean() - q * steps) < 0.5


def test_masked_padding_adds_nothing_to_the_clipped_sum(dp_digits):
  if not hasattr(clipjax, "per_example_clipped_grad"):
    pytest.skip("clipjax.per_example_clipped_grad is not available")
  from flax import nnx

  x_train, y_train, _, _ = dp_digits.load_split()
  model = dp_digits.MLP(32, nnx.Rngs(0))
  f = nnx.jit(clipjax.per_example_clipped_grad(dp_digits.per_example_loss, l2_clip=1.0))
  x, y = jnp.asarray(x_train[:8]), jnp.asarray(y_train[:8])
  padded = jnp.concatenate([x, jnp.repeat(x[:1], 4, axis=0)])
  padded_y = jnp.concatenate([y, jnp.repeat(y[:1], 4)])
  mask = jnp.concatenate([jnp.ones(8), jnp.zeros(4)])
  grads, norms = f(model, x, y, jnp.ones(8))
  padded_grads, padded_norms = f(model, padded, padded_y, mask)
  np.testing.assert_allclose(padded_norms[:8], norms, rtol=1e-5)
  np.testing.assert_array_equal(padded_norms[8:], 0.0)
  leaves, padded_leaves = jax.tree.leaves(grads), jax.tree.leaves(padded_grads)
  assert len(leaves) == 4  # two kernels, two biases
  for a, b in zip(leaves, padded_leaves, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

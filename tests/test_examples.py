"""The example scripts and ``clipjax demo`` do what they say, checked by hand."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import clipjax
import clipjax.cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
  """Imports ``examples/<name>.py`` (the folder is not a package)."""
  spec = importlib.util.spec_from_file_location(
    f"_example_{name}", EXAMPLES / f"{name}.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def linear_regression():
  pytest.importorskip("flax")
  return _load("linear_regression")


@pytest.fixture(scope="module")
def clip_sweep():
  return _load("clip_sweep")


def _numpy_sgd(w, b, x, y, *, lr, steps, bound=None):
  """SGD on mean((sigmoid(w x + b) - y) ** 2) with hand-written gradients.

  Each step's gradient is value-clipped to ``[-bound, bound]`` unless ``bound``
  is None. Returns ``(w, b)`` and each step's raw and applied gradient.
  """
  raw, applied = [], []
  for _ in range(steps):
    s = 1 / (1 + np.exp(-(w * x + b)))
    common = 2 * (s - y) * s * (1 - s)
    grad = np.array([np.mean(common * x), np.mean(common)])
    step = grad if bound is None else np.clip(grad, -bound, bound)
    raw.append(grad)
    applied.append(step)
    w, b = w - lr * step[0], b - lr * step[1]
  return (w, b), np.array(raw), np.array(applied)


def test_classic_example_applies_the_value_clipped_gradient(linear_regression):
  example = linear_regression
  x, y, _ = example.classic_data()
  model = example.make_model("sigmoid")
  # Start where d/db is above the bound and d/dw below it, so clipping changes
  # one leaf of the gradient and not the other.
  model.linear.kernel[...] = jnp.zeros((1, 1), jnp.float32)
  model.linear.bias[...] = jnp.full((1,), 1.5, jnp.float32)
  lr, bound, steps = 0.01, 0.1, 5
  xs, ys = np.asarray(x, np.float64)[:, 0], np.asarray(y, np.float64)[:, 0]
  clipped_wb, raw, applied = _numpy_sgd(
    0.0, 1.5, xs, ys, lr=lr, steps=steps, bound=bound
  )
  unclipped_wb, _, _ = _numpy_sgd(0.0, 1.5, xs, ys, lr=lr, steps=steps)
  assert np.all(np.abs(raw[:, 1]) > 1.5 * bound)
  assert np.all(np.abs(raw[:, 0]) < bound)

  history = example.train(model, clipjax.clip(bound), x, y, steps=steps, lr=lr)

  got = example.line_of(model.linear)
  np.testing.assert_allclose(got, clipped_wb, rtol=1e-5)
  # Applying the raw gradient would have moved the bias 0.005+ further.
  assert abs(got[1] - unclipped_wb[1]) > 100 * 1e-5 * abs(unclipped_wb[1])
  np.testing.assert_allclose(history["norm_before"], np.hypot(*raw.T), rtol=1e-4)
  np.testing.assert_allclose(history["norm_after"], np.hypot(*applied.T), rtol=1e-4)
  np.testing.assert_allclose(history["scale"], bound / np.abs(raw[:, 1]), rtol=1e-4)
  # clip_stats, read from the NNX optimizer state: one of the two elements clipped.
  (fraction,) = [k for k in history if k.startswith("clip/clipped_fraction")]
  np.testing.assert_array_equal(history[fraction], np.full(steps, 0.5))


def test_global_norm_clipping_fits_the_line_despite_outliers(linear_regression):
  lr_mod = linear_regression
  plain, plain_history = lr_mod.run_outliers(None, steps=300)
  clipped, clipped_history = lr_mod.run_outliers(1.0, steps=300)
  plain_fit, clipped_fit = lr_mod.fit_report(plain), lr_mod.fit_report(clipped)

  assert clipped_fit["param_error"] < 0.25 * plain_fit["param_error"]
  assert clipped_fit["clean_mse"] < 0.1 * plain_fit["clean_mse"]
  assert clipped_fit["param_error"] < 0.6
  # The clipper fired on outlier batches and held the applied norm to the bound.
  assert 0.1 < np.mean(clipped_history["scale"] < 1) < 0.9
  assert np.max(clipped_history["norm_after"]) <= 1.0 + 1e-5
  assert np.max(plain_history["norm_after"]) > 10.0
  np.testing.assert_allclose(
    plain_history["norm_after"], plain_history["norm_before"], rtol=1e-5
  )


def test_vmapped_sweep_equals_separate_runs(clip_sweep):
  bounds = [0.1, 0.5, 2.0, 100.0]
  together = clip_sweep.sweep(bounds, steps=100)
  apart = clip_sweep.sweep(bounds, steps=100, vmap=False)

  assert together.shape == (len(bounds),)
  np.testing.assert_allclose(together, apart, rtol=1e-5, atol=1e-6)
  # Each copy got its own bound: the results differ from bound to bound.
  assert len(set(np.round(together, 5).tolist())) == len(bounds)


def _demo_row(text: str, run: str) -> tuple[float, int, float, float]:
  """``(final loss, % of steps clipped, last two columns)`` of a demo table row."""
  m = re.search(rf"^  {re.escape(run)}  +(\S+) +(\d+)% +(.*)$", text, re.M)
  assert m, (run, text)
  *_, a, b = m[3].split()
  return float(m[1]), int(m[2]), float(a), float(b)


def test_demo_writes_a_plot_and_prints_a_summary(tmp_path, capsys):
  pytest.importorskip("flax")
  pytest.importorskip("matplotlib")
  pytest.importorskip("tqdm")
  out = tmp_path / "out"

  code = clipjax.cli.main(["demo", "--steps", "50", "--out", str(out), "--no-progress"])

  printed = capsys.readouterr().out
  png = out / "clipjax-demo.png"
  assert code == 0
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert f"plot: {png}" in printed
  case1, case2 = printed.split("case 2:")
  assert "case 1:" in case1 and "target" in case1 and "true line" in case2
  runs = {}
  for name, text in (("no clipping", case1), ("clip(0.1)", case1)):
    runs[1, name] = _demo_row(text, name)
  for name in ("no clipping", "clip_by_global_norm(1)"):
    runs[2, name] = _demo_row(case2, name)
  # Unclipped, nothing is clipped; the clippers fire (case 1's gradient stays
  # above 0.1 in every step, case 2's only on batches with an outlier).
  assert runs[1, "no clipping"][1] == runs[2, "no clipping"][1] == 0
  assert runs[1, "clip(0.1)"][1] == 100
  assert 10 <= runs[2, "clip_by_global_norm(1)"][1] <= 90
  # Case 2, what the docs say of it: unclipped, the outliers drag the line away
  # (its intercept far above the true 1); clipped, the fit stays near the
  # true line (after 50 steps: MSE 0.08 against 4.3, intercept 1.2 against 3.1).
  (mse, _, _, plain_b), (clipped_mse, _, _, clipped_b) = (
    runs[2, "no clipping"],
    runs[2, "clip_by_global_norm(1)"],
  )
  assert clipped_mse < 0.1 * mse
  assert abs(clipped_b - 1.0) < 0.5 and abs(plain_b - 1.0) > 1.5


def test_demo_without_extras_says_what_to_install(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "flax", None)

  with pytest.raises(SystemExit) as exit_info:
    clipjax.cli.main(["demo", "--steps", "1", "--out", str(tmp_path)])

  assert exit_info.value.code == 1
  assert "pip install 'optax-clipjax[examples]'" in capsys.readouterr().err
  assert not list(tmp_path.iterdir())


def test_cli_rejects_bad_arguments(capsys):
  with pytest.raises(SystemExit) as exit_info:
    clipjax.cli.main(["demo", "--clip", "-1"])
  assert exit_info.value.code == 2
  assert "--clip" in capsys.readouterr().err


def test_importing_clipjax_and_its_cli_loads_no_optional_extras():
  script = (
    "import sys, clipjax, clipjax.cli, clipjax._demo\n"
    "extras = {'flax', 'matplotlib', 'tqdm'} & set(sys.modules)\n"
    "assert not extras, extras\n"
  )
  subprocess.run([sys.executable, "-c", script], check=True)
  help_text = subprocess.run(
    [sys.executable, "-m", "clipjax", "demo", "--help"],
    check=True,
    capture_output=True,
    text=True,
  ).stdout
  assert "--no-progress" in help_text

"""Smoke test of benchmarks/per_example.py: it runs, reports every row, and its
methods' clipped sums agree; on the scanned transformer and the CNNs the ghost
path takes no vmap fallback, and memory and goals are reported; timings are
not judged."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

import clipjax

SCRIPT = (
  pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "per_example.py"
)
NEW_MODELS = ["scan-transformer", "wrn-cnn", "digits-cnn"]  # issue 14's
MODELS = ["mlp-512", "mlp-1024", "transformer", *NEW_MODELS]
METHODS = [
  "jax plain",
  "clipjax ghost",
  "clipjax vmap",
  "optax",
  "jax_privacy",
  "nnx plain",
  "clipjax ghost nnx",
  "torch plain",
  "opacus hooks",
  "opacus ghost",
]
TORCH_METHODS = ["torch plain", "opacus hooks", "opacus ghost"]
NUMBER = r"\d+\.\d+"

# The quick benchmark takes 2.5 minutes of a worker, and the README's second
# test command (which .ci/run always runs) runs this file with the compare
# extra and every row: the first command's run, without torch, Opacus or
# jax_privacy, would repeat it with fewer rows.
pytestmark = pytest.mark.skipif(
  os.environ.get("CLIPJAX_REQUIRE_COMPARE") != "1"
  and importlib.util.find_spec("torch") is None,
  reason="runs in the README's comparison command (the compare extra installed)",
)


def _installed(*names: str) -> bool:
  return all(importlib.util.find_spec(n) is not None for n in names)


def _run(tmp_path: pathlib.Path, *args: str) -> tuple[str, dict, str]:
  out_json, out_md = tmp_path / "results.json", tmp_path / "results.md"
  proc = subprocess.run(
    [
      sys.executable,
      str(SCRIPT),
      "--quick",
      "--json",
      str(out_json),
      "--markdown",
      str(out_md),
      *args,
    ],
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr
  return proc.stdout, json.loads(out_json.read_text()), out_md.read_text()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  return _run(tmp_path_factory.mktemp("per_example"))


def _rows(stdout: str, model: str) -> dict[str, str]:
  """Method -> the rest of its line, in ``model``'s table."""
  section = stdout.split(f"== {model}:", 1)[1].split("\n== ", 1)[0]
  rows = {}
  for line in section.splitlines():
    for method in sorted(METHODS, key=len, reverse=True):
      if line.startswith(method + " "):
        rows[method] = line[len(method) :].strip()
        break
  return rows


def _expect_timed(rows: dict[str, str], method: str) -> None:
  assert re.match(rf"{NUMBER}\s+{NUMBER}\s", rows[method]), (method, rows[method])


def test_every_model_has_a_table_with_every_method(quick_run):
  stdout, results, markdown = quick_run
  assert "CPUs" in stdout.splitlines()[0] and "jax " in stdout.splitlines()[0]
  assert [r["model"] for r in results["results"]] == MODELS
  for model in MODELS:
    rows = _rows(stdout, model)
    assert sorted(rows) == sorted(METHODS), (model, stdout)
    _expect_timed(rows, "jax plain")
    _expect_timed(rows, "optax")
    assert f"**{model}**" in markdown
  assert "| method | ms/step (median) |" in markdown


def test_the_clipped_sums_of_all_methods_agree(quick_run):
  stdout, results, _ = quick_run
  assert "WARNING" not in stdout, stdout
  for result in results["results"]:
    timed = [
      r for r in result["rows"] if r["status"] == "ok" and "plain" not in r["method"]
    ]
    assert len(result["checks"]) == len(timed) - 1, result
    assert all(c["ok"] for c in result["checks"]), result["checks"]


def test_plain_rows_have_ratio_one_and_others_positive(quick_run):
  _, results, _ = quick_run
  for result in results["results"]:
    for row in result["rows"]:
      if row["status"] != "ok":
        continue
      assert row["ms"] > 0 and row["reps"] >= 1, row
      if row["method"].endswith(" plain"):
        assert row["ratio"] == 1.0, row
      else:
        assert row["ratio"] > 0, row


def test_clipjax_rows(quick_run):
  stdout, _, _ = quick_run
  available = hasattr(clipjax, "per_example_clipped_grad")
  for model in MODELS:
    rows = _rows(stdout, model)
    for method in ("clipjax ghost", "clipjax vmap", "clipjax ghost nnx"):
      if method.endswith("nnx") and not _installed("flax"):
        assert rows[method] == "not installed", rows[method]
      elif available:
        _expect_timed(rows, method)
      else:
        assert rows[method] == "unavailable", rows[method]


def test_nnx_plain_row(quick_run):
  stdout, _, _ = quick_run
  for model in MODELS:
    rows = _rows(stdout, model)
    if _installed("flax"):
      _expect_timed(rows, "nnx plain")
    else:
      assert rows["nnx plain"] == "not installed", rows["nnx plain"]


def test_jax_privacy_row(quick_run):
  if not _installed("jax_privacy"):
    pytest.skip("jax_privacy is not installed")
  stdout, _, _ = quick_run
  for model in MODELS:
    _expect_timed(_rows(stdout, model), "jax_privacy")


def test_torch_rows(quick_run):
  stdout, _, _ = quick_run
  for model in MODELS:
    rows = _rows(stdout, model)
    if not _installed("torch"):
      assert all(rows[m] == "not installed" for m in TORCH_METHODS), rows
      continue
    _expect_timed(rows, "torch plain")
    for method in ("opacus hooks", "opacus ghost"):
      if _installed("opacus"):
        _expect_timed(rows, method)
      else:
        assert rows[method] == "not installed", rows[method]


def test_rows_over_the_memory_bound_are_skipped(tmp_path):
  stdout, results, _ = _run(
    tmp_path, "--models", "mlp-512", "--reps", "1", "--max-per-example-gb", "0"
  )
  rows = _rows(stdout, "mlp-512")
  for method in ("clipjax vmap", "optax", "jax_privacy", "opacus hooks"):
    assert rows[method].startswith(("skipped", "not installed", "unavailable")), (
      method,
      rows[method],
    )
  _expect_timed(rows, "jax plain")
  assert [r["model"] for r in results["results"]] == ["mlp-512"]


def test_scanned_and_conv_models_take_the_ghost_path(quick_run):
  _, results, _ = quick_run
  if not hasattr(clipjax, "per_example_clipped_grad"):
    pytest.skip("clipjax.per_example_clipped_grad is unavailable")
  by_model = {r["model"]: r for r in results["results"]}
  for model in NEW_MODELS:
    result = by_model[model]
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["clipjax ghost"]["status"] == "ok", rows["clipjax ghost"]
    plans = [result["ghost_plan"]]
    if _installed("flax"):
      assert rows["clipjax ghost nnx"]["status"] == "ok", rows["clipjax ghost nnx"]
      plans.append(result["ghost_plan_nnx"])
    for plan in plans:
      assert plan and all(way.startswith("ghost") for way in plan), (model, plan)
    rules = " ".join(result["ghost_plan"])
    if model == "scan-transformer":
      assert "in scan (L=2, stacked)" in rules, rules
    else:
      assert "conv" in rules, rules
    # The ghost rows' clipped sums were checked against the others' (and
    # test_the_clipped_sums_of_all_methods_agree says they all agreed).
    checked = {c["method"] for c in result["checks"]}
    checked |= {c["reference"] for c in result["checks"]}
    ghosts = {m for m in ("clipjax ghost", "clipjax ghost nnx") if m in rows}
    assert {m for m in ghosts if rows[m]["status"] == "ok"} <= checked, checked
    assert all(c["ok"] for c in result["checks"]), result["checks"]


def test_memory_and_goals_are_reported(quick_run):
  stdout, results, markdown = quick_run
  if not hasattr(clipjax, "per_example_clipped_grad"):
    pytest.skip("clipjax.per_example_clipped_grad is unavailable")
  goals = {"mlp-512": 1.3, "mlp-1024": 1.3, "scan-transformer": 1.3}
  goals |= {"wrn-cnn": 1.5, "digits-cnn": 1.5}
  for result in results["results"]:
    model = result["model"]
    memory = result["memory"]["jax"]
    assert memory["ghost_mb"] > 0 and memory["plain_mb"] > 0, memory
    assert memory["ratio"] == pytest.approx(memory["ghost_mb"] / memory["plain_mb"])
    section = stdout.split(f"== {model}:", 1)[1].split("\n== ", 1)[0]
    assert re.search(
      rf"memory \(XLA temporaries \+ outputs\): clipjax ghost {NUMBER} MiB vs jax"
      rf" plain {NUMBER} MiB \({NUMBER}x\)",
      section,
    ), section
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["clipjax ghost"]["memory_mb"] == pytest.approx(memory["ghost_mb"])
    assert "memory_mb" not in rows["torch plain"], rows["torch plain"]
    assert result["goal"] == goals.get(model), result["goal"]
    if model in goals:
      ratio = rows["clipjax ghost"]["ratio"]
      met = "met" if ratio <= goals[model] else "NOT met"
      assert (
        f"goal: clipjax ghost <= {goals[model]}x jax plain: {met} ({ratio:.2f}x)"
        in section
      ), section
    if rows["opacus ghost"]["status"] == "ok":
      assert "goal: clipjax ghost faster than opacus ghost: " in section, section
  assert "| XLA temp + output MiB |" in markdown

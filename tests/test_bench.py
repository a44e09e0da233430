"""clipjax bench: runs the benchmark scripts and joins their results in one table."""

import json
import sys

import pytest
from _run import run

from clipjax import _bench, cli


def test_bench_runs_a_script_and_writes_one_table(tmp_path):
  stdout = run(
    sys.executable, "-m", "clipjax", "bench", "--only", "compressors", "--out", tmp_path
  )
  assert "[1/1] compressors.py --reps 15" in stdout
  table = (tmp_path / "bench.md").read_text()
  assert table in stdout
  assert "| compressors | top_k(0.01, sampled) encode | " in table
  assert "exact lax.top_k" in table and "cpus" in table
  data = json.loads((tmp_path / "bench.json").read_text())
  assert data["command"] == "clipjax bench"
  cases = {r["case"] for r in data["rows"]}
  assert "sign() encode+decode" in cases
  assert all(r["ratio"] > 0 for r in data["rows"])


def test_per_example_rows_are_ratios_to_their_own_framework():
  data = {
    "results": [
      {
        "model": "m",
        "rows": [
          {
            "method": "jax plain",
            "framework": "jax",
            "status": "ok",
            "ms": 2.0,
            "ratio": 1.0,
          },
          {
            "method": "clipjax ghost",
            "framework": "jax",
            "status": "ok",
            "ms": 2.2,
            "ratio": 1.1,
          },
          {
            "method": "opacus ghost",
            "framework": "torch",
            "status": "not installed",
            "ms": None,
            "ratio": None,
          },
        ],
      }
    ]
  }
  rows = _bench._rows_per_example(data)
  assert [r["case"] for r in rows] == ["m: clipjax ghost", "m: opacus ghost"]
  assert rows[0]["baseline"] == "jax plain" and rows[0]["ratio"] == 1.1
  assert rows[1]["ratio"] is None and rows[1]["note"] == "not installed"
  assert "| not installed |" in _bench.markdown(rows, {"cpus": "2"}, "clipjax bench")


def test_missing_benchmarks_folder_is_a_clear_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["bench", "--benchmarks", str(tmp_path)])
  assert exit_info.value.code == 1
  assert "no benchmarks in" in capsys.readouterr().err


def test_many_leaves_rows_give_step_and_compile_ratios():
  data = {
    "rows": [
      {
        "case": "zclip()",
        "leaves": 148,
        "width": 64,
        "state_arrays": 11,
        "baseline": "optax.clip_by_global_norm",
        "ms": 3.0,
        "baseline_ms": 2.0,
        "ratio": 1.5,
        "compile_s": 1.0,
        "baseline_compile_s": 0.5,
        "compile_ratio": 2.0,
      }
    ]
  }
  step, compile_ = _bench.PARSERS["many_leaves.py"](data)
  assert step["case"] == "zclip() step, 148 leaves, width 64, 11 state arrays"
  assert (step["ms"], step["ratio"]) == (3.0, 1.5)
  assert compile_["case"] == "zclip() trace+compile, 148 leaves, width 64"
  assert (compile_["ms"], compile_["baseline_ms"], compile_["ratio"]) == (
    1000.0,
    500.0,
    2.0,
  )

"""Smoke test of benchmarks/adaptive_overhead.py: it runs and reports; timings are
not judged."""

import json
import pathlib
import re
import sys

from _run import run

SCRIPT = (
  pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "adaptive_overhead.py"
)
CLIPPERS = [
  "autoclip",
  "zclip",
  "skip_and_clip",
  "adagc",
  "quantile_clip",
  "spam_clip",
  "clippy",
]


def test_adaptive_overhead_quick_prints_a_ratio_per_clipper(tmp_path):
  out_json = tmp_path / "results.json"
  stdout = run(sys.executable, SCRIPT, "--quick", "--json", out_json)
  for name in CLIPPERS:
    row = rf"^{name}\s+(global|tensor|element)\s+[\d.]+\s+[\d.]+\s+(\d+\.\d+)\s"
    assert re.search(row, stdout, re.MULTILINE), (name, stdout)
  results = json.loads(out_json.read_text())["results"]
  assert [r["clipper"] for r in results] == CLIPPERS
  assert all(r["ratio"] > 0 and r["baseline_ms"] > 0 for r in results)

"""Smoke test of the benchmark scripts: they run and report; timings are not judged."""

import json
import pathlib
import re
import sys

from _run import run

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
CLIPPERS = [
  "clip(0.1)",
  "clip(0.1, stats=False)",
  "clip_by_block_rms(0.1)",
  "clip_by_global_norm(1.0)",
  "adaptive_grad_clip(0.1)",
]


def test_clip_overhead_quick_prints_a_ratio_per_clipper(tmp_path):
  out_json = tmp_path / "results.json"
  stdout = run(
    sys.executable, BENCHMARKS / "clip_overhead.py", "--quick", "--json", out_json
  )
  for name in CLIPPERS:
    for dtype in ("float32", "bfloat16"):
      row = rf"^{re.escape(name)}\s+{dtype}\s+[\d.]+\s+[\d.]+\s+(\d+\.\d+)\s"
      assert re.search(row, stdout, re.MULTILINE), (name, dtype, stdout)
  results = json.loads(out_json.read_text())["results"]
  assert sorted({r["clipper"] for r in results}) == sorted(CLIPPERS)
  assert all(r["ratio"] > 0 for r in results)

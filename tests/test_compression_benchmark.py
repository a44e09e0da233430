"""Smoke test of ``benchmarks/compressors.py``: it runs and reports; timings are
not judged (a 256K-element array says nothing about 25M)."""

import json
import re
import sys
from pathlib import Path

from _run import run

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_quick_run_reports_every_compressor(tmp_path):
  out_json = tmp_path / "results.json"
  stdout = run(
    sys.executable, BENCHMARKS / "compressors.py", "--quick", "--json", out_json
  )
  results = json.loads(out_json.read_text())
  names = [r["compressor"] for r in results["compressors"]]
  assert names == [
    "top_k(0.01, sampled)",
    "random_k(0.01)",
    "qsgd()",
    "qsgd(norm='l2')",
    "terngrad()",
    "sign()",
    "natural()",
    "cast(bfloat16)",
    "cast(float16)",
    "powersgd(4)",
  ]
  n = 512 * 512
  wire = {r["compressor"]: r["wire_ratio"] for r in results["compressors"]}
  assert wire["sign()"] == 4 * n / (n // 8 + 4)
  assert wire["terngrad()"] == 4 * n / (n // 4 + 4)
  assert wire["cast(bfloat16)"] == 2.0
  assert wire["powersgd(4)"] == 4 * n / (4 * (512 + 512) * 4)
  assert all(r["ratio"] > 0 for r in results["compressors"])
  assert results["top_k"]["speedup"] > 0
  for name in names:
    assert re.search(rf"^{re.escape(name)}\s+[\d.]+\s+[\d.]+\s+[\d.]+", stdout, re.M)
  assert "goal sampled top-k >= 5x exact" in stdout

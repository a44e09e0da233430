"""``examples/compressed_digits.py`` runs and reports the bytes its payloads hold."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The MLP's leaves: 64-128-128-10 weights and biases.
LEAVES = [64 * 128, 128, 128 * 128, 128, 128 * 10, 10]
METHODS = ["dense", "top_k + EF", "sign + EF", "powersgd r=2 + EF", "qsgd"]


def _table(stdout: str) -> dict[str, list[str]]:
  rows = {}
  for line in stdout.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("|") and cells[0] not in ("method", "---"):
      rows[cells[0]] = cells
  return rows


def test_quick_run_prints_accuracy_and_exact_bytes():
  pytest.importorskip("sklearn")
  done = subprocess.run(
    [
      sys.executable,
      str(ROOT / "examples" / "compressed_digits.py"),
      "--quick",
      "--methods",
      ",".join(METHODS),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert done.returncode == 0, done.stderr[-4000:]
  rows = _table(done.stdout)
  assert list(rows) == METHODS
  for cells in rows.values():
    assert 0.5 < float(cells[1]) <= 1.0  # two epochs already learn digits
  dense = 4 * sum(LEAVES)
  top_k = sum(8 * max(1, math.ceil(0.01 * n)) for n in LEAVES)
  sign = sum(-(-n // 8) + 4 for n in LEAVES)
  qsgd = sum(n + 4 * -(-n // 128) for n in LEAVES)
  # PowerSGD rank 2 compresses the three weight matrices, sends biases dense.
  power = 4 * 2 * (64 + 128 + 128 + 128 + 128 + 10) + 4 * (128 + 128 + 10)
  expected = {
    "dense": dense,
    "top_k + EF": top_k,
    "sign + EF": sign,
    "powersgd r=2 + EF": power,
    "qsgd": qsgd,
  }
  for name, sent in expected.items():
    assert int(rows[name][2]) == sent, name
    assert rows[name][3] == f"{dense / sent:.1f}x"


def test_unknown_method_is_refused():
  done = subprocess.run(
    [
      sys.executable,
      str(ROOT / "examples" / "compressed_digits.py"),
      "--quick",
      "--methods",
      "gzip",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert done.returncode != 0 and "unknown methods ['gzip']" in done.stderr

"""``examples/dp_chars.py``: DP-SGD through a scanned transformer, run as a user would.

The quick run (a tiny model, 20 steps) goes in a subprocess; its printed plan
must show every block parameter on the ghost path inside the scan, and its
table both runs, finite validation losses below the uniform guess's, and the
epsilon the accountant gives for its sampling rate and steps.
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_trains_through_the_scan_on_the_ghost_path():
  pytest.importorskip("flax")
  pytest.importorskip("dp_accounting")
  from clipjax import privacy

  done = subprocess.run(
    [sys.executable, str(ROOT / "examples" / "dp_chars.py"), "--quick"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  assert done.returncode == 0, done.stderr[-4000:]
  out = done.stdout
  plan = next(line for line in out.splitlines() if line.startswith("ghost plan"))
  assert "vmap" not in plan, plan
  assert "ghost: dense (outer) in scan (L=2, stacked)" in plan, plan
  assert "ghost: elementwise (per-example, small) in scan (L=2, stacked)" in plan
  rows = {}
  for line in out.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("| ") and cells[0] not in ("training", "---"):
      rows[cells[0].split(" (")[0]] = cells[1:]
  assert set(rows) == {"non-private SGD", "DP-SGD"}, out
  vocab = int(out.split("vocab ")[1].split(";")[0])
  for name, (loss, _, _) in rows.items():
    assert 0 < float(loss) < math.log(vocab), (name, out)
  assert rows["non-private SGD"][1] == "inf"
  assert float(rows["DP-SGD"][1]) == pytest.approx(
    privacy.epsilon(1.0, 64 / 2048, 20, 1e-5), abs=0.005
  )

"""examples/data_parallel.py: one process x 8 devices against 2 processes x 4."""

import subprocess
import sys
from pathlib import Path

import numpy as np

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data_parallel.py"
METHODS = "top_k,powersgd"


def _run(tmp_path, name, *args):
  out = tmp_path / name
  proc = subprocess.run(
    [
      sys.executable,
      str(EXAMPLE),
      "--steps",
      "5",
      "--methods",
      METHODS,
      "--save",
      str(out),
      *args,
    ],
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out, proc.stdout


def test_two_processes_end_identical_and_equal_to_one_process(tmp_path):
  single, table = _run(tmp_path, "single")
  assert "| top_k(0.004) | error_feedback |" in table
  assert "30.8x" in table and "31.3x" in table
  multi, table2 = _run(tmp_path, "multi", "--processes", "2")
  assert "8 devices in 2 process(es)" in table2
  for method in METHODS.split(","):
    p0 = np.load(multi / f"{method}_params_0.npz")
    p1 = np.load(multi / f"{method}_params_1.npz")
    ref = np.load(single / f"{method}_params_0.npz")
    assert sorted(p0) == sorted(ref) and len(ref) == 6
    for k in ref:
      np.testing.assert_array_equal(p0[k], p1[k])  # both processes agree exactly
      # gloo and the in-process all-reduce may add in different orders.
      np.testing.assert_allclose(p0[k], ref[k], rtol=0, atol=1e-6)

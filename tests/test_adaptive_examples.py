"""``examples/spikes.py`` and ``examples/lr_sweep.py`` run and report every method.

Each runs in ``--quick`` mode in a subprocess, as a user would run it; the
checks are on what it writes, not on how well each clipper did (beyond the
sweep's premise that its smallest rate trains).
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Methods that both examples compare in their default (and quick) runs.
METHODS = (
  "none",
  "clip_by_global_norm",
  "adaptive_grad_clip",
  "autoclip",
  "zclip",
  "adagc",
  "skip_and_clip",
)


def _run_example(name: str, *args: str) -> str:
  """Runs ``examples/<name>.py`` from the repository root; returns its stdout."""
  done = subprocess.run(
    [sys.executable, str(ROOT / "examples" / f"{name}.py"), *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  assert done.returncode == 0, done.stderr[-4000:]
  return done.stdout


def _table_rows(table: str) -> dict[str, list[str]]:
  """The markdown table's body: first cell -> all cells."""
  rows = {}
  for line in table.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("|") and cells[0] not in ("method", "---"):
      rows[cells[0]] = cells
  return rows


def test_spikes_quick_writes_plot_and_table(tmp_path):
  pytest.importorskip("flax")
  pytest.importorskip("matplotlib")
  out = tmp_path / "spikes"

  printed = _run_example("spikes", "--quick", "--out", str(out))

  png, md = out / "loss.png", out / "table.md"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  table = md.read_text()
  rows = _table_rows(table)
  for method in METHODS:
    assert method in rows, method
    assert f"| {method} |" in printed
  # method | clipper | spikes | diverged at | train | val | clipped | skipped | s
  for cells in rows.values():
    assert len(cells) == 9
    assert int(cells[2]) >= 0
  assert int(rows["none"][6]) == 0  # nothing to clip without a clipper
  assert "1.5x the median of the previous 50 steps" in table
  assert (out / "history.npz").exists()


def test_lr_sweep_quick_writes_table(tmp_path):
  pytest.importorskip("flax")
  pytest.importorskip("sklearn")
  out = tmp_path / "lr_sweep"

  printed = _run_example("lr_sweep", "--quick", "--out", str(out))

  table = (out / "table.md").read_text()
  rows = _table_rows(table)
  for method in METHODS:
    assert method in rows, method
    assert f"| {method} |" in printed
  header = table.splitlines()[0]
  n_rates = len(header.strip("|").split("|")) - 3
  assert n_rates >= 5
  for cells in rows.values():
    assert len(cells) == 3 + n_rates
    for cell in cells[3:]:
      assert cell == "div" or 0.0 <= float(cell) <= 1.0
  # The smallest rates train for every method (the table's premise).
  assert all(float(cells[3]) > 0.5 for cells in rows.values())

"""``examples/spikes.py`` and ``examples/lr_sweep.py`` show what the README says.

Each runs in ``--quick`` mode in a subprocess, as a user would run it, and the
checks are the README's qualitative claims about its table, on a quick
configuration where they hold (the README's numbers come from the full runs,
minutes long). What quick mode cannot show is said where it is left out.
"""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
# Methods that both examples compare in their default (and quick) runs.
METHODS = (
  "none",
  "clip_by_global_norm",
  "adaptive_grad_clip",
  "autoclip",
  "zclip",
  "zclip_capped",
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


# Quick mode trains one block of width 16 for 100 steps. At the full run's
# learning rate, 0.5, nothing spikes there, not even unclipped; at 1.0 the
# unclipped run blows up as the README's full run does at 0.5, and the rows
# fall as the README's do.
SPIKES_LR = "1.0"
# The methods the README says prevent the divergence.
STABLE = ("clip_by_global_norm", "adaptive_grad_clip", "zclip_capped", "adagc")
BLOWN_UP = 10.0  # a final loss this many times the first step's: blown up


def test_spikes_quick_shows_the_readme_pattern(tmp_path):
  pytest.importorskip("flax")
  pytest.importorskip("matplotlib")
  out = tmp_path / "spikes"

  printed = _run_example("spikes", "--quick", "--lr", SPIKES_LR, "--out", str(out))

  png, md = out / "loss.png", out / "table.md"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  table = md.read_text()
  rows = _table_rows(table)
  assert set(rows) == set(METHODS), rows
  for method in METHODS:
    assert f"| {method} |" in printed
  assert "1.5x the median of the previous 50 steps" in table
  # method | clipper | spikes | diverged at | train | val | clipped | skipped | s
  assert all(len(cells) == 9 for cells in rows.values())
  spikes = {m: int(cells[2]) for m, cells in rows.items()}
  diverged = {m: cells[3] != "-" for m, cells in rows.items()}
  final = {m: float(cells[4]) for m, cells in rows.items()}
  history = np.load(out / "history.npz")
  first = float(history["loss/none"][0])  # the same model and batch for all
  for method in METHODS:
    assert math.isclose(history[f"loss/{method}"][0], first, rel_tol=1e-6)

  def blew_up(method: str) -> bool:
    return diverged[method] or not final[method] < BLOWN_UP * first

  # Unclipped, training spikes and blows up; nothing to clip or skip.
  assert spikes["none"] >= 10 and blew_up("none"), rows["none"]
  assert rows["none"][6:8] == ["0", "0"]
  # A fixed global bound, AGC, AdaGC, a capped ZClip and skip_and_clip all
  # prevent it: no spike, no divergence, and the loss goes down.
  for method in (*STABLE, "skip_and_clip"):
    assert spikes[method] == 0 and not diverged[method], rows[method]
    assert final[method] < first, rows[method]
  # skip_and_clip skipped no step, so it did what clip_by_global_norm did: the
  # same row, step for step the same losses.
  assert rows["skip_and_clip"][7] == "0"
  assert rows["skip_and_clip"][2:8] == rows["clip_by_global_norm"][2:8]
  np.testing.assert_allclose(
    history["loss/skip_and_clip"], history["loss/clip_by_global_norm"], rtol=1e-5
  )
  # ZClip with its paper defaults lets its 25 warm-up steps through unclipped,
  # and the model blows up during them.
  assert not history["clipped/zclip"][:25].any()
  assert spikes["zclip"] >= 10 and blew_up("zclip"), rows["zclip"]
  # AutoClip never clips its first step (its norm is its own percentile). The
  # early spikes that cost it in the full run do not show in 100 quick steps,
  # so only the mechanism is checked.
  assert not history["clipped/autoclip"][0]
  assert history["clipped/autoclip"][1:].any()


# Quick mode: 200 steps and one seed, on 8 of the default grid's 15 rates
# (np.logspace(-2, 1.5, 15)), among them the README table's columns 0.316 to
# 1.78, so that its claims can be checked at the rates it quotes.
SWEEP_RATES = tuple(
  float(r) for r in np.logspace(-2, 1.5, 15)[[0, 4, 6, 7, 8, 9, 12, 14]]
)


def _rate(accuracy: dict[float, float], rate: float) -> float:
  (key,) = [r for r in accuracy if math.isclose(r, rate, rel_tol=2e-3)]
  return accuracy[key]


def test_lr_sweep_quick_shows_the_readme_pattern(tmp_path):
  pytest.importorskip("flax")
  pytest.importorskip("sklearn")
  out = tmp_path / "lr_sweep"
  rates = [repr(r) for r in SWEEP_RATES]

  printed = _run_example("lr_sweep", "--quick", "--rates", *rates, "--out", str(out))

  table = (out / "table.md").read_text()
  rows = _table_rows(table)
  for method in METHODS:
    assert method in rows, method
    assert f"| {method} |" in printed
  header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
  columns = [float(c) for c in header[3:]]
  assert len(columns) == len(SWEEP_RATES)
  accuracy = {}
  for method, cells in rows.items():
    assert len(cells) == 3 + len(columns)
    values = [0.0 if c == "div" else float(c) for c in cells[3:]]
    assert all(0.0 <= v <= 1.0 for v in values)
    accuracy[method] = dict(zip(columns, values, strict=True))
  at = lambda method, rate: _rate(accuracy[method], rate)
  gradient_clippers = [m for m in rows if m not in ("none", "clippy")]

  # The smallest rate trains for every method (the table's premise).
  assert all(at(m, 0.01) > 0.5 for m in rows)
  # One seed over 200 steps sits within a few hundredths of the table's 0.9
  # at several rates, and a change in rounding (the norm kernel's, say) moves
  # such cells by that much; so the "largest rate" column is not compared, and
  # each claim below holds in quick mode by a margin of 0.07 or more.
  # Unclipped, 0.1 trains and 1.0 is at chance (README: 0.316 is its largest
  # rate, 0.099 at 1.0).
  assert at("none", 0.1) >= 0.9 and at("none", 1.0) < 0.2
  # A fixed bound widens the range to 0.562, as do a capped ZClip and
  # skip_and_clip (README: 0.937 to 0.951 there, against 0.134 unclipped).
  for method in ("clip_by_global_norm", "zclip_capped", "skip_and_clip"):
    assert at(method, 0.562) > at("none", 0.562) + 0.3, (method, accuracy[method])
  # AGC, AutoClip, AdaGC and quantile clipping widen it further, to 1.0
  # (README: 0.944 to 0.967 there, against 0.398 for clip_by_global_norm(1.0)).
  # Quick mode's one seed of 200 steps at 1.0 is chaotic: a rounding change
  # (91b74b0 or later) moved clip_by_global_norm from 0.56-0.59 to 0.73, and
  # AutoClip (0.72-0.74) moves with it; AGC, AdaGC and quantile clipping stay
  # at 0.92-0.95.
  wider = ("adaptive_grad_clip", "autoclip", "adagc", "quantile_clip")
  for method in wider:
    assert at(method, 1.0) > 0.6, (method, accuracy[method])
  for method in ("adaptive_grad_clip", "adagc", "quantile_clip"):
    assert at(method, 1.0) > at("clip_by_global_norm", 1.0) + 0.1, accuracy
  # ZClip without max_norm and SPAM clip relative to their own history and do
  # not widen the range (README: 0.319 and 0.101 at 0.562).
  for method in ("zclip", "spam_clip"):
    assert at(method, 0.562) < 0.6, (method, accuracy[method])
  # Bounding the gradient before momentum widens the range a few times at
  # most: at 10 (30x unclipped's largest rate) every such clipper is at chance.
  for method in gradient_clippers:
    assert at(method, 10.0) < 0.2, (method, accuracy[method])
  # Clippy bounds the update, not the gradient: it trains at every rate of the
  # grid (README: its largest rate 31.6, the grid's largest; quick mode: 0.94
  # to 0.97).
  assert min(accuracy["clippy"].values()) > 0.85, accuracy["clippy"]

"""examples/low_communication.py --quick, on 8 devices and as 2 processes x 4.

Checks what the example's table rests on: every configuration trains (finite
and lower validation losses), the bytes it reports are the ones DiLoCo's
formula gives (uncompressed DiLoCo sends data parallelism's all-reduce once
every H updates: exactly H times fewer bytes), compression orders the
configurations as their payloads say, and the 2-process run ends with the
same params, bit for bit, on every process, and the losses of the 8-device run.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "low_communication.py"
QUICK_H = 8  # low_communication.QUICK.sync_every
QUICK_STEPS = 24  # low_communication.QUICK.steps
CONFIGS = ("data_parallel", "diloco", "diloco_int8", "streaming_4bit", "sparseloco")


def _run(out: Path, *args: str) -> tuple[str, list[dict]]:
  proc = subprocess.run(
    [sys.executable, str(EXAMPLE), "--quick", "--json", str(out), *args],
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout, json.loads(out.read_text())


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  pytest.importorskip("flax")
  pytest.importorskip("matplotlib")
  directory = tmp_path_factory.mktemp("low_communication")
  plot = directory / "loss.png"
  stdout, rows = _run(directory / "one.json", "--plot", str(plot))
  return stdout, {r["config"]: r for r in rows}, plot


def test_every_configuration_trains(quick):
  stdout, rows, plot = quick
  assert tuple(rows) == CONFIGS
  for name, r in rows.items():
    losses = [loss for _, loss in r["curve"]]
    assert all(math.isfinite(v) for v in losses), name
    assert losses[-1] < losses[0] - 0.3, (name, losses)  # from ~4.4 nats
    assert r["devices"] == 8 and r["processes"] == 1
  assert "| configuration | final val loss |" in stdout
  assert plot.stat().st_size > 10_000


def test_bytes_follow_the_formula(quick):
  _, rows, _ = quick
  dense = rows["data_parallel"]["dense_bytes_per_step"]
  assert rows["data_parallel"]["bytes_per_step"] == dense
  assert rows["data_parallel"]["ratio_to_dp"] == 1.0
  # A float32 pmean of the pseudo-gradient is the dense all-reduce, once per H.
  assert rows["diloco"]["ratio_to_dp"] == QUICK_H
  assert rows["diloco"]["bytes_per_step"] == dense / QUICK_H
  for name in ("diloco", "diloco_int8", "sparseloco"):  # one fragment
    r = rows[name]
    assert r["bytes_per_step"] == pytest.approx(r["stats_bytes_per_step"], rel=1e-6)
    assert r["stats_ratio"] == pytest.approx(dense / r["stats_bytes_per_step"], 1e-6)
  # Streaming: 2 fragments, synced at 8, 16, 24 and 12, 20: 5 syncs of about
  # half the model in 24 updates, where a period of 8 holds 2.
  stream = rows["streaming_4bit"]
  assert stream["bytes_per_step"] < stream["stats_bytes_per_step"]
  assert stream["bytes_per_step"] > 0.6 * stream["stats_bytes_per_step"]
  # int8 < float32; 4-bit < int8; sparse 2-bit top-2 of 64 least of all.
  ratios = [rows[n]["ratio_to_dp"] for n in CONFIGS[1:]]
  assert ratios == sorted(ratios) and ratios[0] == QUICK_H
  assert ratios[1] > 3 * QUICK_H and ratios[-1] > 15 * QUICK_H


def test_two_processes_agree_with_each_other_and_with_one(quick, tmp_path):
  _, one, _ = quick
  # Streaming DiLoCo: local steps, staggered fragments and a compressed
  # reduce-scatter with error feedback, all across the process boundary.
  stdout, rows = _run(
    tmp_path / "two.json", "--processes", "2", "--configs", "streaming_4bit"
  )
  assert "params identical on all 2 processes: True" in stdout
  assert [r["config"] for r in rows] == ["streaming_4bit"]
  for r in rows:
    assert r["devices"] == 8 and r["processes"] == 2
    ref = one[r["config"]]
    assert r["bytes_per_step"] == ref["bytes_per_step"]
    # The same batches and math; only the collectives' summation order may
    # differ between gloo and the in-process all-reduce.
    assert r["val_loss"] == pytest.approx(ref["val_loss"], abs=2e-3)

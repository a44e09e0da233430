"""Checkpoint, kill, resume: clipjax states round-trip through orbax bit for bit.

Three subprocesses run tests/_resume_worker.py on the same chains: one trains
without interruption; one saves a checkpoint (params, optax state, step) with
orbax's ``StandardCheckpointer`` mid-way, keeps training and is SIGKILLed; a new
one restores into ``jax.eval_shape``'s abstract target and trains to the end.
The resumed parameters must equal the uninterrupted ones exactly. No pickling:
the states are ordinary pytrees (NamedTuples, registered dataclasses, arrays).
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("_resume_worker.py")
SAVE_AT = 17  # as in the worker
CHAINS = (
  "zclip_adam",
  "autoclip_adam",
  "adagc_adam",
  "topk_ef_sgd",
  "powersgd_ef_sgd",
  "qsgd_sgd",
  "dgc_sgd",
  "diloco_qsgd",
)
TIMEOUT_S = 120


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)  # all three runs alike: one CPU device each
  return env


def _worker(mode: str, directory: Path) -> list[str]:
  return [sys.executable, str(WORKER), mode, str(directory)]


def _check(proc: subprocess.CompletedProcess, mode: str) -> None:
  assert proc.returncode == 0, f"{mode} worker failed:\n{proc.stderr[-4000:]}"


def _crash(directory: Path) -> list[str]:
  """Runs the crash worker, SIGKILLs it mid-run after its checkpoint; its stdout."""
  proc = subprocess.Popen(
    _worker("crash", directory),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=_env(),
  )
  lines = []
  try:
    assert proc.stdout is not None
    for line in proc.stdout:
      lines.append(line.strip())
      # Kill once it is training past the checkpoint, its in-memory state newer.
      if line.startswith("step ") and int(line.split()[1]) >= SAVE_AT + 3:
        proc.send_signal(signal.SIGKILL)
        break
  finally:
    if proc.poll() is None:  # an error here, or the SIGKILL not yet delivered
      proc.kill()
    _, err = proc.communicate(timeout=TIMEOUT_S)
  assert proc.returncode == -signal.SIGKILL, (
    f"crash worker was not killed mid-run (rc {proc.returncode}):\n{err[-4000:]}"
  )
  return lines


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  directory = tmp_path_factory.mktemp("resume")
  # The uninterrupted run shares nothing with the other two but the code.
  full = subprocess.Popen(
    _worker("full", directory),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=_env(),
  )
  try:
    crash_lines = _crash(directory)
  finally:
    out, err = full.communicate(timeout=TIMEOUT_S)
  _check(subprocess.CompletedProcess(full.args, full.returncode, out, err), "full")
  assert crash_lines[0] == "saved"
  resume = subprocess.run(
    _worker("resume", directory),
    capture_output=True,
    text=True,
    env=_env(),
    timeout=TIMEOUT_S,
  )
  _check(resume, "resume")
  with np.load(directory / "full.npz") as f, np.load(directory / "resume.npz") as r:
    return dict(f), dict(r)


def test_worker_runs_every_chain(runs):
  full, resumed = runs
  assert {k.split("/")[0] for k in full} == set(CHAINS)
  assert set(full) == set(resumed)


def _part(arrays: dict[str, np.ndarray], chain: str, part: str):
  prefix = f"{chain}/{part}"
  return {k: v for k, v in arrays.items() if k.startswith(prefix)}


@pytest.mark.parametrize("chain", CHAINS)
def test_restored_state_is_the_saved_state(runs, chain):
  full, resumed = runs
  saved = _part(full, chain, "saved_state")
  restored = _part(resumed, chain, "saved_state")
  assert saved and saved.keys() == restored.keys()
  for name, value in saved.items():
    assert restored[name].dtype == value.dtype, name
    np.testing.assert_array_equal(restored[name], value, err_msg=name, strict=True)


@pytest.mark.parametrize("chain", CHAINS)
def test_resumed_params_bit_identical(runs, chain):
  full, resumed = runs
  expected = _part(full, chain, "params")
  got = _part(resumed, chain, "params")
  assert len(expected) == 4 and expected.keys() == got.keys()
  if chain.startswith("diloco"):  # fragment 1 is mid-period: devices differ
    assert any(not np.array_equal(v[0], v[1]) for v in expected.values())
  for name, value in expected.items():
    assert got[name].dtype == value.dtype == np.float32, name
    if chain.startswith("diloco"):  # per device: 4 devices' params
      assert value.shape[0] == 4, name
    np.testing.assert_array_equal(got[name], value, err_msg=name, strict=True)


def test_checkpoints_hold_live_state(runs):
  """The checkpoints carry state that matters: residuals, factors, histories."""
  full, _ = runs

  def nonzero(chain: str, needle: str) -> bool:
    hits = [
      v for k, v in full.items() if k.startswith(f"{chain}/saved_state") and needle in k
    ]
    return bool(hits) and any(np.any(v != 0) for v in hits)

  assert nonzero("topk_ef_sgd", ".feedback")  # error-feedback residuals
  assert nonzero("powersgd_ef_sgd", ".compressor.groups")  # PowerSGD's Q
  assert nonzero("qsgd_sgd", ".key") and nonzero("qsgd_sgd", ".step")
  assert nonzero("autoclip_adam", ".history")
  assert nonzero("zclip_adam", ".mean")
  assert nonzero("adagc_adam", ".gamma")
  assert nonzero("dgc_sgd", ".feedback")
  assert nonzero("diloco_qsgd", ".anchor") and nonzero("diloco_qsgd", ".inner")
  assert nonzero("diloco_qsgd", ".exchange[0].feedback")  # int8 residuals
  assert nonzero("diloco_qsgd", ".outer[1]")  # fragment 1's Nesterov momentum

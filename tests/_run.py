"""The tests' one way to run a command in its own process and check it exited 0."""

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path


def run(
  *args: str | Path,
  cwd: Path | None = None,
  env: Mapping[str, str] | None = None,
  timeout: float = 600,
) -> str:
  """Runs ``args`` and returns its stdout; fails with the ends of both streams.

  ``env`` replaces the environment (default: this process's).
  """
  done = subprocess.run(
    [os.fspath(a) for a in args],
    cwd=cwd,
    env=None if env is None else dict(env),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  assert done.returncode == 0, (
    f"{' '.join(map(str, args))} exited {done.returncode}\n"
    f"--- stdout (end) ---\n{done.stdout[-2000:]}\n"
    f"--- stderr (end) ---\n{done.stderr[-4000:]}"
  )
  return done.stdout

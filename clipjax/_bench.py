"""``clipjax bench``: the benchmarks of ``benchmarks/`` in one run and one table.

Each benchmark script runs in its own process (so each measures a fresh JAX)
and writes JSON; this module turns those into one table of ratios, every one
measured side by side within its own script: clipjax against optax, against
the plain step of the same framework (JAX or PyTorch, with jax_privacy and
Opacus where installed), against exact ``lax.top_k``, or in memory passes.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

# script -> (arguments in quick mode, in full mode); quick keeps the issues'
# sizes where they are cheap and trims repetitions and models.
SCRIPTS: dict[str, tuple[list[str], list[str]]] = {
  "clip_overhead.py": (["--reps", "30"], []),
  "adaptive_overhead.py": (["--reps", "30"], []),
  "compressors.py": (["--reps", "15"], []),
  "per_example.py": (["--models", "mlp-512", "--reps", "15", "--row-seconds", "8"], []),
  # Quick: 148 leaves at width 64 and one case per family; full: every case at
  # 148 and 436 leaves, widths 64 and 768 (about an hour on 2 cores).
  "many_leaves.py": (
    [
      "--quick",
      "--reps",
      "10",
      "--only",
      "clip_by_global_norm(1.0)",
      "zclip()",
      "compress(top_k(0.01))",
    ],
    [],
  ),
}


class BenchError(RuntimeError):
  """The benchmarks could not be run (not found, or a script failed)."""


def find_benchmarks(path: str | None) -> Path:
  """The ``benchmarks/`` folder: ``path``, or the one beside the package."""
  where = Path(path) if path else Path(__file__).resolve().parents[1] / "benchmarks"
  if not (where / "clip_overhead.py").exists():
    raise BenchError(
      f"clipjax bench: no benchmarks in {where}; run it from a clone of the"
      " repository (pip install -e .) or pass --benchmarks DIR."
    )
  return where


def machine() -> dict[str, str]:
  """What the numbers were measured on."""
  info = {
    "platform": platform.platform(),
    "processor": platform.machine(),
    "cpus": str(os.cpu_count()),
    "python": platform.python_version(),
  }
  for package in ("jax", "optax", "clipjax", "flax", "torch", "opacus", "jax-privacy"):
    try:
      info[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      info[package] = "not installed"
  return info


def _rows_clip(data: dict[str, Any]) -> list[dict[str, Any]]:
  return [
    {
      "benchmark": "clip_overhead",
      "case": f"{r['clipper']} {r['dtype']}",
      "ms": r["clipjax_ms"],
      "baseline": "optax, same chain",
      "baseline_ms": r["optax_ms"],
      "ratio": r["ratio"],
    }
    for r in data["results"]
  ]


def _rows_adaptive(data: dict[str, Any]) -> list[dict[str, Any]]:
  return [
    {
      "benchmark": "adaptive_overhead",
      "case": r["clipper"],
      "ms": r["ms"],
      "baseline": "clipjax.clip_by_global_norm",
      "baseline_ms": r["baseline_ms"],
      "ratio": r["ratio"],
    }
    for r in data["results"]
  ]


def _rows_compressors(data: dict[str, Any]) -> list[dict[str, Any]]:
  top = data["top_k"]
  rows = [
    {
      "benchmark": "compressors",
      "case": "top_k(0.01, sampled) encode",
      "ms": top["ms"],
      "baseline": "exact lax.top_k",
      "baseline_ms": top["baseline_ms"],
      "ratio": top["ratio"],
    }
  ]
  rows += [
    {
      "benchmark": "compressors",
      "case": f"{r['compressor']} encode+decode",
      "ms": r["ms"],
      "baseline": "one memory pass",
      "baseline_ms": r["baseline_ms"],
      "ratio": r["ratio"],
    }
    for r in data["compressors"]
  ]
  return rows


def _rows_per_example(data: dict[str, Any]) -> list[dict[str, Any]]:
  rows = []
  for model in data["results"]:
    plain = {
      r["framework"]: r
      for r in model["rows"]
      if r["method"].endswith("plain") and r["status"] == "ok"
    }
    for r in model["rows"]:
      if r["method"].endswith("plain"):
        continue
      base = plain.get(r["framework"])
      ok = r["status"] == "ok" and base is not None
      rows.append(
        {
          "benchmark": "per_example",
          "case": f"{model['model']}: {r['method']}",
          "ms": r["ms"] if ok else None,
          "baseline": f"{base['method']}" if base else "-",
          "baseline_ms": base["ms"] if base else None,
          "ratio": r["ratio"] if ok else None,
          "note": None if ok else r["status"],
        }
      )
  return rows


def _rows_many_leaves(data: dict[str, Any]) -> list[dict[str, Any]]:
  rows = []
  for r in data["rows"]:
    where = f"{r['leaves']} leaves, width {r['width']}"
    rows.append(
      {
        "benchmark": "many_leaves",
        "case": f"{r['case']} step, {where}, {r['state_arrays']} state arrays",
        "ms": r["ms"],
        "baseline": r["baseline"],
        "baseline_ms": r["baseline_ms"],
        "ratio": r["ratio"],
      }
    )
    rows.append(
      {
        "benchmark": "many_leaves",
        "case": f"{r['case']} trace+compile, {where}",
        "ms": r["compile_s"] * 1e3,
        "baseline": r["baseline"],
        "baseline_ms": r["baseline_compile_s"] * 1e3,
        "ratio": r["compile_ratio"],
      }
    )
  return rows


PARSERS: dict[str, Callable[[dict[str, Any]], list[dict[str, Any]]]] = {
  "clip_overhead.py": _rows_clip,
  "adaptive_overhead.py": _rows_adaptive,
  "compressors.py": _rows_compressors,
  "per_example.py": _rows_per_example,
  "many_leaves.py": _rows_many_leaves,
}


def markdown(rows: list[dict[str, Any]], info: dict[str, str], command: str) -> str:
  """The table, with the machine and the command that made it."""
  described = ", ".join(f"{k} {v}" for k, v in info.items())
  lines = [
    f"Measured by `{command}` on: {described}.",
    "",
    "| benchmark | case | ms | against | its ms | ratio |",
    "|---|---|---:|---|---:|---:|",
  ]

  def num(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)

  for r in rows:
    ratio = num(r["ratio"], ".2f") if r["ratio"] is not None else r.get("note", "-")
    lines.append(
      f"| {r['benchmark']} | {r['case']} | {num(r['ms'], '.2f')} |"
      f" {r['baseline']} | {num(r['baseline_ms'], '.2f')} | {ratio} |"
    )
  return "\n".join(lines) + "\n"


def run(
  *, full: bool, out: str, benchmarks: str | None = None, only: list[str] | None = None
) -> Path:
  """Runs the benchmarks, prints the table, writes ``bench.md`` and ``bench.json``."""
  where = find_benchmarks(benchmarks)
  names = [n for n in SCRIPTS if not only or n.removesuffix(".py") in only]
  rows: list[dict[str, Any]] = []
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    for i, name in enumerate(names, 1):
      quick_args, full_args = SCRIPTS[name]
      target = Path(tmp) / f"{name}.json"
      args = [*(full_args if full else quick_args), "--json", str(target)]
      print(
        f"[{i}/{len(names)}] {name} {' '.join(args[:-2])}"
        f" ({time.perf_counter() - start:.0f} s so far)",
        flush=True,
      )
      done = subprocess.run(
        [sys.executable, name, *args],
        cwd=where,
        capture_output=True,
        text=True,
        check=False,
      )
      if done.returncode != 0:
        raise BenchError(
          f"clipjax bench: {name} failed ({done.returncode}):\n{done.stderr[-2000:]}"
        )
      rows += PARSERS[name](json.loads(target.read_text()))
  info = machine()
  command = "clipjax bench" + (" --full" if full else "")
  table = markdown(rows, info, command)
  folder = Path(out)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "bench.md").write_text(table)
  (folder / "bench.json").write_text(
    json.dumps({"machine": info, "command": command, "rows": rows}, indent=2)
  )
  print()
  print(table)
  print(f"wrote {folder / 'bench.md'} and {folder / 'bench.json'}", flush=True)
  return folder

"""Per-step cost of the adaptive clippers against a fixed global-norm clip.

Each adaptive clipper is chained with ``optax.sgd(0.1)`` (Clippy after it, as
Clippy bounds the optimizer's update) and jitted as one training step that
carries its state::

  updates, state = tx.update(grads, state, params)
  params = optax.apply_updates(params, updates)

The baseline is the same step with ``clipjax.clip_by_global_norm(1.0)``. Both
run interleaved in one process (A, B, then B, A, ...), each carrying its own
params and optimizer state from one call to the next, on the same gradients
(a small pool of distinct trees, passed as arguments so that nothing is
constant-folded). The table reports median milliseconds per step, the ratio
of the medians, and the quartiles of the per-pair ratios as a noise measure.
The issue's goal is a ratio <= 1.10 for the global-scope clippers (autoclip,
zclip, skip_and_clip): one global norm, like the baseline.

Usage::

  python benchmarks/adaptive_overhead.py              # 16 leaves of 1024x1024
  python benchmarks/adaptive_overhead.py --quick      # smoke test, small shapes
  python benchmarks/adaptive_overhead.py --reps 200 --json results.json
"""

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from _timing import interleaved, paired_quartiles

import clipjax

GOAL = 1.10
SGD = 0.1

# name -> (scope, the chain to time); defaults are the papers' unless noted.
CLIPPERS: dict[str, tuple[str, Callable[[], optax.GradientTransformation]]] = {
  "autoclip": ("global", lambda: optax.chain(clipjax.autoclip(), optax.sgd(SGD))),
  "zclip": ("global", lambda: optax.chain(clipjax.zclip(), optax.sgd(SGD))),
  # drop_norm high enough that no step of the benchmark is skipped.
  "skip_and_clip": (
    "global",
    lambda: optax.chain(clipjax.skip_and_clip(1.0, 1e12), optax.sgd(SGD)),
  ),
  "adagc": ("tensor", lambda: optax.chain(clipjax.adagc(), optax.sgd(SGD))),
  "quantile_clip": (
    "tensor",
    lambda: optax.chain(clipjax.quantile_clip(), optax.sgd(SGD)),
  ),
  "spam_clip": ("element", lambda: optax.chain(clipjax.spam_clip(), optax.sgd(SGD))),
  "clippy": ("element", lambda: optax.chain(optax.sgd(SGD), clipjax.clippy())),
}


def baseline() -> optax.GradientTransformation:
  return optax.chain(clipjax.clip_by_global_norm(1.0), optax.sgd(SGD))


def make_trees(
  n_leaves: int, shape: tuple[int, ...], pool: int, seed: int = 0
) -> tuple[dict[str, jax.Array], list[dict[str, jax.Array]]]:
  """Float32 params and a pool of gradient trees with per-leaf scales 1e-3..10."""
  rng = np.random.default_rng(seed)
  names = [f"w{i:02d}" for i in range(n_leaves)]
  params = {k: rng.standard_normal(shape, np.float32) for k in names}
  grads = []
  for _ in range(pool):
    scales = 10.0 ** rng.uniform(-3, 1, size=n_leaves)
    grads.append(
      {
        k: rng.standard_normal(shape, np.float32) * np.float32(s)
        for k, s in zip(names, scales, strict=True)
      }
    )
  to_device = lambda tree: jax.tree.map(jax.numpy.asarray, tree)
  return to_device(params), [to_device(g) for g in grads]


class Side:
  """A jitted training step that carries its own params and optimizer state."""

  def __init__(self, tx: optax.GradientTransformation, params: Any):
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    self.step = jax.jit(step)
    self.carry = (params, tx.init(params))

  def __call__(self, grads: Any) -> float:
    start = time.perf_counter()
    self.carry = jax.block_until_ready(self.step(*self.carry, grads))
    return time.perf_counter() - start


def run(
  n_leaves: int,
  shape: tuple[int, ...],
  reps: int,
  warmup: int,
  pool: int,
  names: list[str],
) -> list[dict[str, Any]]:
  params, grads = make_trees(n_leaves, shape, pool)
  results = []
  for name in names:
    scope, make = CLIPPERS[name]
    side, base_side = Side(make(), params), Side(baseline(), params)
    times, base = interleaved(
      lambda i, side=side: side(grads[i % len(grads)]),
      lambda i, base_side=base_side: base_side(grads[i % len(grads)]),
      reps,
      warmup,
    )
    q25, q75 = paired_quartiles(times, base)
    ms, base_ms = statistics.median(times) * 1e3, statistics.median(base) * 1e3
    results.append(
      {
        "clipper": name,
        "scope": scope,
        "ms": ms,
        "baseline_ms": base_ms,
        "ratio": ms / base_ms,
        "pair_ratio_q25": q25,
        "pair_ratio_q75": q75,
        "reps": reps,
      }
    )
    print(_row(results[-1]), flush=True)
  return results


_HEADER = (
  f"{'clipper':<14} {'scope':<8} {'ms':>9} {'global ms':>10} {'ratio':>6}"
  "   paired q25-q75"
)


def _row(r: dict[str, Any]) -> str:
  over = "  > goal" if r["scope"] == "global" and r["ratio"] > GOAL else ""
  return (
    f"{r['clipper']:<14} {r['scope']:<8} {r['ms']:>9.3f} {r['baseline_ms']:>10.3f}"
    f" {r['ratio']:>6.3f}   {r['pair_ratio_q25']:.3f}-{r['pair_ratio_q75']:.3f}{over}"
  )


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, help="timed calls per side (default 100)")
  parser.add_argument(
    "--quick", action="store_true", help="small shapes and few reps (smoke test)"
  )
  parser.add_argument(
    "--only", nargs="+", choices=list(CLIPPERS), help="time only these clippers"
  )
  parser.add_argument("--json", metavar="PATH", help="also write the results here")
  args = parser.parse_args(argv)

  if args.quick:
    n_leaves, shape, reps, warmup, pool = 16, (32, 32), 5, 1, 2
  else:
    n_leaves, shape, reps, warmup, pool = 16, (1024, 1024), 100, 3, 3
  if args.reps is not None:
    if args.reps < 1:
      parser.error(f"--reps={args.reps} must be at least 1")
    reps = args.reps
  names = args.only or list(CLIPPERS)

  device = jax.devices()[0].device_kind
  print(
    f"{n_leaves} float32 leaves of {shape}, {reps} interleaved reps per side,"
    f" baseline clip_by_global_norm(1.0), each chained with sgd({SGD});"
    f" jax {jax.__version__}, optax {optax.__version__},"
    f" clipjax {clipjax.__version__}, {device}"
  )
  print(_HEADER)
  results = run(n_leaves, shape, reps, warmup, pool, names)
  print(f"goal: ratio <= {GOAL:.2f} for the global-scope clippers")

  if args.json:
    meta = {
      "n_leaves": n_leaves,
      "shape": list(shape),
      "reps": reps,
      "baseline": "clip_by_global_norm(1.0)",
      "goal": GOAL,
      "jax": jax.__version__,
      "optax": optax.__version__,
      "clipjax": clipjax.__version__,
      "device": device,
      "machine": platform.machine(),
      "python": sys.version.split()[0],
    }
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "results": results}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())

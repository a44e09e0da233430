"""Per-step cost of clipjax's clippers against optax's, measured side by side.

For each clipper that optax 0.2.8 also has, both versions are chained with
``optax.sgd(0.1)`` and jitted as one training step::

  updates, state = tx.update(grads, state, params)
  params = optax.apply_updates(params, updates)

The two steps run interleaved in one process (A, B, then B, A, ...) on the same
inputs, so drift in the machine's speed hits both sides alike; the table
reports the median time per step, the ratio clipjax / optax of the medians,
and the quartiles of the per-pair ratios as a measure of the noise. Nothing is
donated on either side. The gradients cycle through a small pool of distinct
trees passed as arguments, so nothing is constant-folded or reused.

Usage::

  python benchmarks/clip_overhead.py                 # 16 leaves of 1024x1024
  python benchmarks/clip_overhead.py --quick         # smoke test, small shapes
  python benchmarks/clip_overhead.py --reps 200 --json results.json
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
import jax.numpy as jnp
import numpy as np
import optax
from _timing import interleaved, paired_quartiles

import clipjax

# name -> (clipjax factory, optax factory); the bounds are the brief's.
CLIPPERS: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
  "clip(0.1)": (lambda: clipjax.clip(0.1), lambda: optax.clip(0.1)),
  "clip(0.1, stats=False)": (
    lambda: clipjax.clip(0.1, stats=False),
    lambda: optax.clip(0.1),
  ),
  "clip_by_block_rms(0.1)": (
    lambda: clipjax.clip_by_block_rms(0.1),
    lambda: optax.clip_by_block_rms(0.1),
  ),
  "clip_by_global_norm(1.0)": (
    lambda: clipjax.clip_by_global_norm(1.0),
    lambda: optax.clip_by_global_norm(1.0),
  ),
  "adaptive_grad_clip(0.1)": (
    lambda: clipjax.adaptive_grad_clip(0.1),
    lambda: optax.adaptive_grad_clip(0.1),
  ),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_trees(
  n_leaves: int, shape: tuple[int, ...], pool: int, seed: int = 0
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
  """Float32 params and a pool of gradient trees, as host arrays.

  Each gradient tree has its own scale per leaf (spanning 1e-3 to 1e1), so that
  some blocks are clipped and some are not, and the pattern changes per tree.
  """
  rng = np.random.default_rng(seed)
  params = {
    f"w{i:02d}": rng.standard_normal(shape, np.float32) for i in range(n_leaves)
  }
  grads = []
  for _ in range(pool):
    scales = 10.0 ** rng.uniform(-3, 1, size=n_leaves)
    grads.append(
      {
        k: (rng.standard_normal(shape, np.float32) * np.float32(s))
        for (k, _), s in zip(params.items(), scales, strict=True)
      }
    )
  return params, grads


def make_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step)


def _time_once(fn: Callable[..., Any], args: tuple[Any, ...]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def run(
  n_leaves: int, shape: tuple[int, ...], reps: int, warmup: int, pool: int
) -> list[dict[str, Any]]:
  host_params, host_grads = make_trees(n_leaves, shape, pool)
  results = []
  for dtype_name, dtype in DTYPES.items():
    params = jax.tree.map(lambda x, d=dtype: jnp.asarray(x, d), host_params)
    grads_pool = [
      jax.tree.map(lambda x, d=dtype: jnp.asarray(x, d), g) for g in host_grads
    ]
    for name, (make_ours, make_theirs) in CLIPPERS.items():
      txs = {
        "clipjax": optax.chain(make_ours(), optax.sgd(0.1)),
        "optax": optax.chain(make_theirs(), optax.sgd(0.1)),
      }
      steps = {side: make_step(tx) for side, tx in txs.items()}
      # The same params and gradient arrays go to both sides, each with the
      # state its own init produced from those params.
      args = {
        side: [(params, tx.init(params), g) for g in grads_pool]
        for side, tx in txs.items()
      }

      def runner(side, steps=steps, args=args):
        return lambda i: _time_once(steps[side], args[side][i % len(args[side])])

      times_ours, times_theirs = interleaved(
        runner("clipjax"), runner("optax"), reps, warmup
      )
      ours = statistics.median(times_ours) * 1e3
      theirs = statistics.median(times_theirs) * 1e3
      q25, q75 = paired_quartiles(times_ours, times_theirs)
      pairs = [a / b for a, b in zip(times_ours, times_theirs, strict=True)]
      results.append(
        {
          "clipper": name,
          "dtype": dtype_name,
          "clipjax_ms": ours,
          "optax_ms": theirs,
          "ratio": ours / theirs,
          "pair_ratio_median": statistics.median(pairs),
          "pair_ratio_q25": q25,
          "pair_ratio_q75": q75,
          "clipjax_min_ms": min(times_ours) * 1e3,
          "optax_min_ms": min(times_theirs) * 1e3,
          "reps": reps,
        }
      )
      print(_row(results[-1]), flush=True)
  return results


_HEADER = (
  f"{'clipper':<26} {'dtype':<9} {'clipjax ms':>11} {'optax ms':>9} {'ratio':>6}"
  "   paired ratios q25-q75"
)


def _row(r: dict[str, Any]) -> str:
  return (
    f"{r['clipper']:<26} {r['dtype']:<9} {r['clipjax_ms']:>11.3f}"
    f" {r['optax_ms']:>9.3f} {r['ratio']:>6.3f}"
    f"   {r['pair_ratio_q25']:.3f}-{r['pair_ratio_q75']:.3f}"
  )


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--reps", type=int, default=None, help="timed calls per side (default 100)"
  )
  parser.add_argument(
    "--quick", action="store_true", help="small shapes and few reps (smoke test)"
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

  print(
    f"{n_leaves} leaves of {shape}, {reps} interleaved reps per side,"
    f" jax {jax.__version__}, optax {optax.__version__},"
    f" clipjax {clipjax.__version__}, {jax.devices()[0].device_kind}"
  )
  print(_HEADER)
  results = run(n_leaves, shape, reps, warmup, pool)

  if args.json:
    meta = {
      "n_leaves": n_leaves,
      "shape": list(shape),
      "reps": reps,
      "jax": jax.__version__,
      "optax": optax.__version__,
      "clipjax": clipjax.__version__,
      "device": jax.devices()[0].device_kind,
      "machine": platform.machine(),
      "python": sys.version.split()[0],
    }
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "results": results}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())

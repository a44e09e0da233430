"""Encode+decode time of each compressor on one large gradient, in memory passes.

The gradient is one float32 array of 25M elements (a 5000 x 5000 matrix, which
PowerSGD sees as such). For each compressor, one jitted ``encode`` makes the
payload and one jitted ``decode`` turns it back into the dense estimate: two
executables, so that the payload is materialized in between, as it is when a
collective carries it. (Jitted together, XLA:CPU fuses them into one loop that
recomputes each packed byte once per element it holds, up to twice as slow for
TernGrad; it ignores ``lax.optimization_barrier`` there.) The pair is timed
interleaved with the "memory pass" baseline ``jnp.abs(x).sum()`` (one read of
``x``), in one process on the same input, and reported as the median of the
per-pair ratios: how many memory passes encoding and decoding cost.

The dense result is written into a donated buffer, as a jitted train step that
donates its state writes its update: a fresh 100 MB output each call would add
the kernel's page faults on first touch (about 6 passes on the 2-core VM this
was written on) to every compressor alike. ``--fresh`` times that too, with the
baseline ``x * 2`` (one read, one fresh write) beside it.

Top-k is compared on encoding alone (the payload, static size included):
``top_k(0.01, selection="sampled")`` interleaved with exact ``lax.top_k`` of
the same ``k``.

Goals: sampled top-k at least 5x faster than exact ``lax.top_k``; sign, qsgd,
terngrad, natural and cast each at most 5 memory passes.

The file is not named ``compression.py``: run as a script, that name would
shadow the standard library's ``compression`` package, which JAX imports.

Usage::

  python benchmarks/compressors.py             # 25M elements
  python benchmarks/compressors.py --quick     # smoke test: 256K elements
  python benchmarks/compressors.py --fresh --json results.json
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from _timing import interleaved, paired_quartiles
from jax import lax

from clipjax import compression as cc

COMPRESSORS: dict[str, Callable[[], cc.Compressor]] = {
  "top_k(0.01, sampled)": lambda: cc.top_k(0.01, selection="sampled"),
  "random_k(0.01)": lambda: cc.random_k(0.01),
  "qsgd()": lambda: cc.qsgd(),
  "qsgd(norm='l2')": lambda: cc.qsgd(norm="l2"),
  "terngrad()": lambda: cc.terngrad(),
  "sign()": lambda: cc.sign(),
  "natural()": lambda: cc.natural(),
  "cast(bfloat16)": lambda: cc.cast(jnp.bfloat16),
  "cast(float16)": lambda: cc.cast(jnp.float16),
  "powersgd(4)": lambda: cc.powersgd(4),
}
# The goal of at most 5 memory passes applies to these.
PASS_GOAL = {"qsgd()", "terngrad()", "sign()", "natural()", "cast(bfloat16)"}


def _timer(fn: Callable[[], Any]) -> Callable[[int], float]:
  def run(i: int) -> float:
    del i
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start

  return run


def _roundtrip_call(c: cc.Compressor, x: jax.Array, key: jax.Array, donate: bool):
  """A zero-argument ``decode(encode(x))``: two executables, the payload between.

  With ``donate``, the dense result goes into a buffer reused from call to call.
  """
  state = c.init(x.shape, x.dtype)
  encode = jax.jit(lambda x, key: c.encode(x, state, key))

  def decode_into(out, payload, new_state, key):
    del out
    return c.decode(payload, x.shape, x.dtype, new_state, key)

  decode = jax.jit(
    decode_into, donate_argnums=(0,) if donate else (), keep_unused=donate
  )
  held = {"out": jnp.zeros_like(x)}

  def call():
    payload, new_state = encode(x, key)
    out = decode(held["out"], payload, new_state, key)
    if donate:
      held["out"] = out
    return out

  return call


def _ratio(a: list[float], b: list[float]) -> dict[str, float]:
  q25, q75 = paired_quartiles(a, b)
  pairs = [x / y for x, y in zip(a, b, strict=True)]
  return {
    "ratio": statistics.median(pairs),
    "q25": q25,
    "q75": q75,
    "ms": statistics.median(a) * 1e3,
    "baseline_ms": statistics.median(b) * 1e3,
  }


def run(shape: tuple[int, int], reps: int, warmup: int, fresh: bool) -> dict[str, Any]:
  x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32)
  key = jax.random.PRNGKey(1)
  n = x.size
  dense_bytes = n * 4
  memory_pass = jax.jit(lambda x: jnp.abs(x).sum())
  fresh_write = jax.jit(lambda x: x * 2)
  results: dict[str, Any] = {"compressors": []}

  # Top-k: the payload alone, sampled against exact lax.top_k.
  k = max(1, -(-n // 100))
  exact = jax.jit(lambda x: lax.top_k(jnp.abs(x.reshape(-1)), k))
  sampled_c = cc.top_k(0.01, selection="sampled")
  sampled = jax.jit(lambda x, key: sampled_c.encode(x, (), key)[0])
  exact_reps = max(3, reps // 4)  # exact top-k is slow
  t_sampled, t_exact = interleaved(
    _timer(lambda: sampled(x, key)), _timer(lambda: exact(x)), exact_reps, warmup
  )
  results["top_k"] = _ratio(t_sampled, t_exact)
  results["top_k"]["speedup"] = 1.0 / results["top_k"]["ratio"]
  r = results["top_k"]
  print(
    f"top_k(0.01) encode: sampled {r['ms']:.1f} ms, exact lax.top_k"
    f" {r['baseline_ms']:.1f} ms: sampled is {r['speedup']:.1f}x faster"
    f" (paired q25-q75 {1 / r['q75']:.1f}-{1 / r['q25']:.1f}x)",
    flush=True,
  )

  header = f"{'compressor':<22} {'wire ratio':>10} {'ms':>8} {'passes':>7}   q25-q75"
  if fresh:
    header += f" {'fresh ms':>9} {'x*2 passes':>10} {'passes':>7}"
  print(header)
  for name, make in COMPRESSORS.items():
    c = make()
    row: dict[str, Any] = {
      "compressor": name,
      "wire_ratio": dense_bytes / c.payload_bytes(x.shape, x.dtype),
    }
    call = _roundtrip_call(c, x, key, donate=True)
    a, b = interleaved(_timer(call), _timer(lambda: memory_pass(x)), reps, warmup)
    row.update(_ratio(a, b))
    line = (
      f"{name:<22} {row['wire_ratio']:>10.1f} {row['ms']:>8.2f}"
      f" {row['ratio']:>7.2f}   {row['q25']:.2f}-{row['q75']:.2f}"
    )
    if fresh:
      plain = _roundtrip_call(c, x, key, donate=False)
      af, bf = interleaved(_timer(plain), _timer(lambda: memory_pass(x)), reps, warmup)
      aw, bw = interleaved(
        _timer(lambda: fresh_write(x)), _timer(lambda: memory_pass(x)), reps, warmup
      )
      row["fresh"] = _ratio(af, bf)
      row["fresh_write"] = _ratio(aw, bw)
      line += (
        f" {row['fresh']['ms']:>9.2f} {row['fresh_write']['ratio']:>10.2f}"
        f" {row['fresh']['ratio']:>7.2f}"
      )
    results["compressors"].append(row)
    print(line, flush=True)

  worst = max(
    r["ratio"] for r in results["compressors"] if r["compressor"] in PASS_GOAL
  )
  results["goals"] = {
    "sampled_top_k_at_least_5x": results["top_k"]["speedup"] >= 5.0,
    "quantizers_at_most_5_passes": worst <= 5.0,
  }
  print(
    f"goal sampled top-k >= 5x exact: {results['top_k']['speedup']:.1f}x"
    f" ({'met' if results['goals']['sampled_top_k_at_least_5x'] else 'missed'});"
    f" goal sign/qsgd/terngrad/natural/cast <= 5 passes: worst {worst:.2f}"
    f" ({'met' if results['goals']['quantizers_at_most_5_passes'] else 'missed'})"
  )
  return results


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=None, help="timed pairs (default 20)")
  parser.add_argument(
    "--quick", action="store_true", help="256K elements, few reps (smoke test)"
  )
  parser.add_argument(
    "--fresh", action="store_true", help="also time with a fresh output each call"
  )
  parser.add_argument("--json", metavar="PATH", help="also write the results here")
  args = parser.parse_args(argv)
  shape, reps, warmup = ((512, 512), 4, 1) if args.quick else ((5000, 5000), 20, 2)
  if args.reps is not None:
    if args.reps < 1:
      parser.error(f"--reps={args.reps} must be at least 1")
    reps = args.reps
  print(
    f"{shape[0]}x{shape[1]} float32 ({shape[0] * shape[1] / 1e6:g}M elements),"
    f" {reps} interleaved pairs, jax {jax.__version__},"
    f" {jax.devices()[0].device_kind}"
  )
  results = run(shape, reps, warmup, args.fresh)
  if args.json:
    results["meta"] = {"shape": list(shape), "reps": reps, "jax": jax.__version__}
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Compile time, step time and state on GPT-2-like parameter trees of many leaves.

Real models have hundreds of leaves: a GPT-2-like tree has 148 for 12 blocks
(wte, wpe, per block ln_1/ln_2 scale and bias, the attention's qkv and proj
kernels and biases, the MLP's fc and proj kernels and biases, then ln_f), 436
for 36 blocks. Every public transformation is chained with ``optax.sgd(0.1)``
into a jitted step ``(params, state, grads) -> (params, state)`` and measured
against its optax counterpart, or ``optax.clip_by_global_norm(1.0)`` + the same
SGD where optax has none, side by side in one process:

- trace+compile: seconds of ``jax.jit(step).lower(...).compile()`` of a fresh
  step (after one warm-up compile of the baseline), the best of ``--compiles``;
- step: median milliseconds of the jitted step, clipjax and baseline
  interleaved (A, B, B, A, ...), each carrying its own params and state;
- state arrays: the number of arrays in the transformation's state.

``compressed_mean`` runs inside ``shard_map`` over 8 CPU devices, against a
dense ``jax.lax.pmean`` + SGD there; per-example clips take per-example
gradients of a batch of 4 and are compared with optax's functions.

Usage::

  python benchmarks/many_leaves.py            # 148 and 436 leaves, widths 64, 768
  python benchmarks/many_leaves.py --leaves 148 --widths 64 --only 'zclip()'
  python benchmarks/many_leaves.py --quick    # 148 leaves, width 64
"""

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _timing import interleaved, paired_quartiles  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import clipjax  # noqa: E402
from clipjax import compression, distributed  # noqa: E402

SGD = 0.1
VOCAB, CONTEXT = 50257, 1024
BATCH = 4  # examples of the per-example clips
BLOCKS = {148: 12, 436: 36}

# Goals of issue 13, by family: (trace+compile ratio, step ratio at width 64,
# step ratio at width 768); None where the family has none.
GOALS = {
  "drop-in": (1.5, 1.2, 1.05),
  "clipper": (2.0, 1.2, 1.2),
  "compressor": (5.0, None, None),
}


def gpt2_tree(blocks: int, width: int, seed: int = 0) -> dict[str, Any]:
  """A GPT-2-like parameter tree: ``4 + 12 * blocks`` float32 leaves."""
  rng = np.random.default_rng(seed)
  d = width

  def arr(*shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02)

  def ln():
    return {"scale": arr(d), "bias": arr(d)}

  tree: dict[str, Any] = {"wte": arr(VOCAB, d), "wpe": arr(CONTEXT, d)}
  for i in range(blocks):
    tree[f"h{i}"] = {
      "ln_1": ln(),
      "attn": {
        "qkv": {"kernel": arr(d, 3 * d), "bias": arr(3 * d)},
        "proj": {"kernel": arr(d, d), "bias": arr(d)},
      },
      "ln_2": ln(),
      "mlp": {
        "fc": {"kernel": arr(d, 4 * d), "bias": arr(4 * d)},
        "proj": {"kernel": arr(4 * d, d), "bias": arr(d)},
      },
    }
  tree["ln_f"] = ln()
  return tree


def grads_like(params: Any, pool: int, seed: int = 1) -> list[Any]:
  """A pool of gradient trees with per-leaf scales spread over 1e-3..10."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for _ in range(pool):
    scales = 10.0 ** rng.uniform(-3, 1, size=len(leaves))
    out.append(
      jax.tree.unflatten(
        treedef,
        [
          jnp.asarray(rng.standard_normal(x.shape, np.float32) * np.float32(s))
          for x, s in zip(leaves, scales, strict=True)
        ],
      )
    )
  return out


def optax_gnc() -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(SGD))


def chain(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  return optax.chain(tx, optax.sgd(SGD))


def against_gnc(family: str, make: Callable[[], Any]) -> tuple:
  """A case whose baseline is ``optax.clip_by_global_norm`` + the same SGD."""
  return (family, make, optax_gnc, "optax.clip_by_global_norm")


# name -> (family, clipjax chain, baseline chain, baseline's name). The per-
# example clips and compressed_mean have their own steps, below.
Case = tuple[str, Callable[[], Any], Callable[[], Any], str]
CASES: dict[str, Case] = {
  "clip(0.1)": (
    "drop-in",
    lambda: chain(clipjax.clip(0.1)),
    lambda: chain(optax.clip(0.1)),
    "optax.clip",
  ),
  "clip_by_global_norm(1.0)": against_gnc(
    "drop-in", lambda: chain(clipjax.clip_by_global_norm(1.0))
  ),
  "clip_by_block_rms(0.1)": (
    "drop-in",
    lambda: chain(clipjax.clip_by_block_rms(0.1)),
    lambda: chain(optax.clip_by_block_rms(0.1)),
    "optax.clip_by_block_rms",
  ),
  "adaptive_grad_clip(0.1)": (
    "drop-in",
    lambda: chain(clipjax.adaptive_grad_clip(0.1)),
    lambda: chain(optax.adaptive_grad_clip(0.1)),
    "optax.adaptive_grad_clip",
  ),
  "clip_by_norm(1.0)": against_gnc("clipper", lambda: chain(clipjax.clip_by_norm(1.0))),
  "clip_by_group_norm(1.0)": against_gnc(
    "clipper",
    lambda: chain(
      clipjax.clip_by_group_norm(1.0, lambda t: jax.tree.map(lambda x: x.ndim, t))
    ),
  ),
  "autoclip()": against_gnc("clipper", lambda: chain(clipjax.autoclip())),
  "zclip()": against_gnc("clipper", lambda: chain(clipjax.zclip())),
  "skip_and_clip(1.0, 1e12)": against_gnc(
    "clipper", lambda: chain(clipjax.skip_and_clip(1.0, 1e12))
  ),
  "adagc()": against_gnc("clipper", lambda: chain(clipjax.adagc())),
  "quantile_clip()": against_gnc("clipper", lambda: chain(clipjax.quantile_clip())),
  "spam_clip()": against_gnc("clipper", lambda: chain(clipjax.spam_clip())),
  "clippy()": against_gnc(
    "clipper", lambda: optax.chain(optax.sgd(SGD), clipjax.clippy())
  ),
}
COMPRESSORS: dict[str, Callable[[], Any]] = {
  "top_k(0.01)": lambda: compression.top_k(0.01),
  "random_k(0.01)": lambda: compression.random_k(0.01),
  "qsgd()": lambda: compression.qsgd(),
  "qsgd(norm='l2')": lambda: compression.qsgd(norm="l2"),
  "terngrad()": lambda: compression.terngrad(),
  "natural()": lambda: compression.natural(),
  "cast(bfloat16)": lambda: compression.cast(jnp.bfloat16),
  "sign()": lambda: compression.sign(),
  "powersgd(2)": lambda: compression.powersgd(2),
}
for _name, _make in COMPRESSORS.items():
  CASES[f"compress({_name})"] = against_gnc(
    "compressor", lambda _make=_make: chain(clipjax.compress(_make()))
  )
CASES["dgc(0.01)"] = against_gnc("compressor", lambda: chain(clipjax.dgc(0.01)))
PER_EXAMPLE = {
  "per_example_global_norm_clip": (
    lambda g: clipjax.per_example_global_norm_clip(g, 1.0),
    lambda g: optax.per_example_global_norm_clip(g, 1.0),
  ),
  "per_example_layer_norm_clip": (
    lambda g: clipjax.per_example_layer_norm_clip(g, 1.0),
    lambda g: optax.per_example_layer_norm_clip(g, 1.0),
  ),
}
MESH_CASES = {"compressed_mean(top_k(0.01))": lambda: compression.top_k(0.01)}
MESH_CASES.update(
  {
    f"compressed_mean({n})": COMPRESSORS[n]
    for n in ("sign()", "qsgd()", "powersgd(2)", "cast(bfloat16)")
  }
)


class Step:
  """A jitted step carrying its own params and state; counts its compile."""

  def __init__(self, make_step: Callable[[], Callable], args: tuple, compiles: int):
    self.compile_s = min(self._compile(make_step, args) for _ in range(compiles))
    self.fn = jax.jit(make_step())
    self.carry = args[:-1]
    self.fn(*args)  # the compile that later calls reuse

  @staticmethod
  def _compile(make_step, args) -> float:
    fn = jax.jit(make_step())  # a fresh function: nothing cached
    start = time.perf_counter()
    fn.lower(*args).compile()
    return time.perf_counter() - start

  def __call__(self, grads: Any) -> float:
    start = time.perf_counter()
    self.carry = jax.block_until_ready(self.fn(*self.carry, grads))
    return time.perf_counter() - start


def sgd_step(make_tx: Callable[[], Any]) -> Callable[[], Callable]:
  def make():
    tx = make_tx()

    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return step

  return make


def per_example_step(clip_fn) -> Callable[[], Callable]:
  def make():
    def step(params, stacked):
      leaves, treedef = jax.tree.flatten(stacked)
      summed, _ = clip_fn(leaves)  # optax's signature: a list of leaves
      clipped = jax.tree.unflatten(treedef, summed)
      return jax.tree.map(lambda p, g: p - SGD * g, params, clipped)

    return step

  return make


class PerExampleStep(Step):
  def __init__(self, make_step, args, compiles):
    super().__init__(make_step, args, compiles)

  def __call__(self, grads: Any) -> float:
    start = time.perf_counter()
    self.carry = (jax.block_until_ready(self.fn(*self.carry, grads)),)
    return time.perf_counter() - start


def mesh_step(make_exchange: Callable[[], Any] | None) -> Callable[[], Callable]:
  """Each device's own gradient (a device axis), averaged, then SGD."""
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))

  def make():
    sgd = optax.sgd(SGD)

    @jax.shard_map(
      mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P("data"))
    )
    def step(params, state, grads):
      grads = jax.tree.map(lambda g: g[0], grads)
      if make_exchange is None:
        mean, ex_state = jax.lax.pmean(grads, "data"), state
      else:
        tx = distributed.compressed_mean(make_exchange(), "data")
        ex_state = jax.tree.map(lambda s: s[0], state)
        mean, ex_state = tx.update(grads, ex_state)
        ex_state = jax.tree.map(lambda s: s[None], ex_state)
      updates, _ = sgd.update(mean, sgd.init(params))
      return optax.apply_updates(params, updates), ex_state

    return step

  return make


def state_arrays(tx_or_state: Any) -> int:
  return len(jax.tree.leaves(tx_or_state))


def measure(
  name: str,
  family: str,
  a: Step,
  b: Step,
  grads: list[Any],
  reps: int,
  n_state: int,
  baseline: str,
) -> dict[str, Any]:
  times, base = interleaved(
    lambda i: a(grads[i % len(grads)]), lambda i: b(grads[i % len(grads)]), reps, 2
  )
  q25, q75 = paired_quartiles(times, base)
  ms, base_ms = statistics.median(times) * 1e3, statistics.median(base) * 1e3
  return {
    "case": name,
    "family": family,
    "baseline": baseline,
    "compile_s": a.compile_s,
    "baseline_compile_s": b.compile_s,
    "compile_ratio": a.compile_s / b.compile_s,
    "ms": ms,
    "baseline_ms": base_ms,
    "ratio": ms / base_ms,
    "pair_ratio_q25": q25,
    "pair_ratio_q75": q75,
    "state_arrays": n_state,
  }


def run_size(
  n_leaves: int, width: int, names: list[str], reps: int, compiles: int
) -> list[dict[str, Any]]:
  params = gpt2_tree(BLOCKS[n_leaves], width)
  assert len(jax.tree.leaves(params)) == n_leaves
  pool = grads_like(params, 2)
  rows = []
  warm = Step(sgd_step(optax_gnc), (params, optax_gnc().init(params), pool[0]), 1)
  del warm
  for name in names:
    if name in CASES:
      family, make_a, make_b, base_name = CASES[name]
      a = Step(sgd_step(make_a), (params, make_a().init(params), pool[0]), compiles)
      b = Step(sgd_step(make_b), (params, make_b().init(params), pool[0]), compiles)
      row = measure(
        name, family, a, b, pool, reps, state_arrays(make_a().init(params)), base_name
      )
    elif name in PER_EXAMPLE:
      ours, theirs = PER_EXAMPLE[name]
      stacked = [jax.tree.map(lambda g: jnp.stack([g] * BATCH) * 0.5, g) for g in pool]
      a = PerExampleStep(per_example_step(ours), (params, stacked[0]), compiles)
      b = PerExampleStep(per_example_step(theirs), (params, stacked[0]), compiles)
      row = measure(name, "drop-in", a, b, stacked, reps, 0, f"optax.{name}")
    else:
      stacked = [jax.tree.map(lambda g: jnp.stack([g] * 8), g) for g in pool]
      make_c = MESH_CASES[name]
      tx = distributed.compressed_mean(make_c(), "data")
      mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
      init = jax.jit(
        jax.shard_map(
          lambda g, tx=tx: jax.tree.map(lambda s: s[None], tx.init(g)),
          mesh=mesh,
          in_specs=P(),
          out_specs=P("data"),
        )
      )(params)
      n_state = state_arrays(tx.init(params))
      a = Step(mesh_step(make_c), (params, init, stacked[0]), compiles)
      b = Step(mesh_step(None), (params, (), stacked[0]), compiles)
      row = measure(name, "compressor", a, b, stacked, reps, n_state, "dense pmean")
    row.update(leaves=n_leaves, width=width)
    rows.append(row)
    print(_line(row), flush=True)
    del a, b
    gc.collect()
  return rows


def _line(r: dict[str, Any]) -> str:
  return (
    f"{r['leaves']:>4} {r['width']:>4} {r['case']:<32} compile {r['compile_s']:6.2f}"
    f" / {r['baseline_compile_s']:5.2f} s = {r['compile_ratio']:5.2f}x"
    f"   step {r['ms']:8.2f} / {r['baseline_ms']:8.2f} ms = {r['ratio']:5.2f}x"
    f" ({r['pair_ratio_q25']:.2f}-{r['pair_ratio_q75']:.2f})"
    f"   state {r['state_arrays']}"
  )


def all_names() -> list[str]:
  return [*CASES, *PER_EXAMPLE, *MESH_CASES]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--leaves", default="148,436", help="148 and/or 436")
  parser.add_argument("--widths", default="64,768")
  parser.add_argument("--only", nargs="+", choices=all_names(), metavar="CASE")
  parser.add_argument("--reps", type=int, default=20, help="timed steps per side")
  parser.add_argument("--compiles", type=int, default=1, help="compiles per side")
  parser.add_argument("--quick", action="store_true", help="148 leaves, width 64")
  parser.add_argument("--json", metavar="PATH")
  args = parser.parse_args(argv)
  sizes = [int(n) for n in args.leaves.split(",")]
  widths = [int(w) for w in args.widths.split(",")]
  if args.quick:
    sizes, widths = [148], [64]
  for n in sizes:
    if n not in BLOCKS:
      parser.error(f"--leaves: {n} is not one of {sorted(BLOCKS)}")
  names = args.only or all_names()
  print(
    f"GPT-2-like trees, each step chained with sgd({SGD}); jax {jax.__version__},"
    f" optax {optax.__version__}, {jax.devices()[0].device_kind}"
  )
  rows = []
  for n in sizes:
    for w in widths:
      rows += run_size(n, w, names, args.reps, args.compiles)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"goals": GOALS, "rows": rows}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Low-communication training: data parallelism against DiLoCo and its descendants.

The character-level transformer of ``spikes.py`` (Flax NNX, Python's
standard-library sources as data) trains on 8 CPU devices, each on its own
contiguous shard of the training text, for the same number of updates with
the same per-device batch (so the same tokens) under each configuration:

- ``data_parallel``: the baseline. Every update ``pmean``s the gradients (a
  dense float32 all-reduce) before AdamW.
- ``diloco``: DiLoCo (Douillard et al., 2023) with ``H`` local AdamW steps
  between syncs and an outer Nesterov SGD (0.7, momentum 0.9) on the mean
  pseudo-gradient, sent uncompressed (a float32 ``pmean``).
- ``diloco_int8``: the same with the pseudo-gradient in int8, a scale per 64
  (``quantize(8)``), with error feedback, by a reduce-scatter exchange (as
  INTELLECT-1 sends int8 pseudo-gradients).
- ``streaming_4bit``: Streaming DiLoCo, 4 fragments synced at staggered
  updates, in 4 bits with a scale per 64 (``quantize(4)``), error feedback.
- ``sparseloco``: SparseLoCo-style: the 2 largest of every 64 entries of the
  pseudo-gradient (3.1%), their values in 2 bits, their positions in 6,
  error feedback, gathered by every device.

``--configs`` also takes ``diloco_fp8`` (float8 e4m3 with a power-of-two scale
per 32, by the reduce-scatter exchange: gathered, float8 would cost as much as
the float32 ``pmean`` on 8 devices). Every configuration starts from the same
model, and every device sees the same batches under each. Each is one
``clipjax.distributed`` transformation used inside ``jax.shard_map``, with the
params and the optimizer state per device (a leading device axis, ``P("data")``); the
training runs in jitted chunks of ``H`` updates (a ``lax.scan``), after each
of which the validation loss of the anchor (the consensus model; for data
parallelism, the params) is measured on fixed validation windows.

The table gives the final validation loss, the bytes one device sends per
update (ring collectives: ``2 (N-1)/N`` of a buffer for an all-reduce, ``N-1``
payloads for an all-gather) and the ratio to data parallelism's; the plot
(``--plot``), the validation loss against the bytes sent so far.

What to expect with the defaults (6 minutes on 2 CPU cores): data parallelism
reaches a validation loss of 1.60; DiLoCo 1.93 (+21%) at 50x fewer bytes, the
same with int8 pseudo-gradients at 187x, Streaming DiLoCo in 4 bits 1.91 at
366x, the sparse 2-bit exchange 2.35 at 1,464x. With 8 workers each on an
eighth of the batch and only 20 syncs, DiLoCo stays well short of data
parallelism here; sweeps of the learning rates (inner 3e-3 to 1e-2, outer 0.7
to 1.0, momentum 0.8 or 0.9) and H = 25 left it 15-25% behind.

Run on 8 CPU devices of one process::

  python examples/low_communication.py [--steps 1000] [--plot loss.png]

or as 2 processes x 4 CPU devices on 127.0.0.1 over ``jax.distributed`` with
the gloo CPU collectives (the launcher starts the workers and checks that
every process ends with the same params, bit for bit)::

  python examples/low_communication.py --processes 2

``--quick`` is a small model and a few updates, for the test suite.
Needs ``pip install 'optax-clipjax[examples]'``.
"""

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEVICES = 8


@dataclasses.dataclass(frozen=True)
class Setup:
  """Model, data and training settings shared by every configuration."""

  d_model: int = 64
  heads: int = 4
  layers: int = 2
  context: int = 64
  batch_per_device: int = 8
  steps: int = 1000
  sync_every: int = 50
  fragments: int = 4
  lr: float = 6e-3
  warmup: int = 50
  outer_lr: float = 0.7
  outer_momentum: float = 0.9
  max_chars: int = 4_000_000
  val_batches: int = 8
  seed: int = 0


QUICK = Setup(
  d_model=16,
  heads=2,
  layers=1,
  context=16,
  batch_per_device=4,
  steps=24,
  sync_every=8,
  fragments=2,
  warmup=4,
  max_chars=200_000,
  val_batches=2,
)

# name -> (label, whether it is DiLoCo, fragments (None: Setup's), compressor
# spec, exchange); compressors are built once JAX is set up.
CONFIGS: dict[str, tuple[str, bool, Any, str | None, str]] = {
  "data_parallel": ("data parallel (pmean every update)", False, 1, None, "psum"),
  "diloco": ("DiLoCo, float32 pmean", True, 1, None, "psum"),
  "diloco_int8": ("DiLoCo, int8 + EF", True, 1, "int8", "reduce_scatter"),
  "streaming_4bit": (
    "Streaming DiLoCo, 4-bit + EF",
    True,
    None,
    "int4",
    "reduce_scatter",
  ),
  "sparseloco": ("top-2 of 64, 2-bit values + EF", True, 1, "sparse2", "all_gather"),
  "diloco_fp8": ("DiLoCo, float8 e4m3 + EF", True, 1, "fp8", "reduce_scatter"),
}
DEFAULT_CONFIGS = (
  "data_parallel",
  "diloco",
  "diloco_int8",
  "streaming_4bit",
  "sparseloco",
)


def make_compressor(spec: str | None) -> Any:
  import jax.numpy as jnp

  from clipjax import compression

  if spec is None:
    return None
  return {
    "int8": lambda: compression.quantize(8, chunk_size=64),
    "int4": lambda: compression.quantize(4, chunk_size=64),
    "sparse2": lambda: compression.compose(
      compression.chunked_top_k(2, chunk_size=64),
      values=compression.quantize(2, chunk_size=64),
    ),
    "fp8": lambda: compression.cast(jnp.float8_e4m3fn, chunk_size=32),
  }[spec]()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=None, help=f"default {Setup.steps}")
  p.add_argument("--sync-every", type=int, default=None, help="H, default 50")
  p.add_argument("--lr", type=float, default=None, help=f"default {Setup.lr:g}")
  p.add_argument(
    "--outer-lr", type=float, default=None, help=f"default {Setup.outer_lr:g}"
  )
  p.add_argument(
    "--outer-momentum",
    type=float,
    default=None,
    help=f"default {Setup.outer_momentum:g}",
  )
  p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
  p.add_argument("--quick", action="store_true", help="a tiny run, for the tests")
  p.add_argument("--processes", type=int, default=1)
  p.add_argument("--plot", type=Path, default=None, help="PNG: val loss vs bytes")
  p.add_argument("--json", type=Path, default=None, help="the results as JSON")
  p.add_argument("--seed", type=int, default=0)
  # Set by the launcher for each worker process.
  p.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
  p.add_argument("--save", type=Path, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  for name in args.configs.split(","):
    if name not in CONFIGS:
      p.error(f"--configs: unknown {name!r}; choose from {', '.join(CONFIGS)}")
  return args


def setup_of(args: argparse.Namespace) -> Setup:
  setup = QUICK if args.quick else Setup()
  overrides: dict[str, Any] = {"seed": args.seed}
  if args.steps is not None:
    overrides["steps"] = args.steps
  for field in ("sync_every", "lr", "outer_lr", "outer_momentum"):
    if getattr(args, field) is not None:
      overrides[field] = getattr(args, field)
  return dataclasses.replace(setup, **overrides)


# ---------------------------------------------------------------------------
# Processes


def launch(args: argparse.Namespace, argv: list[str]) -> int:
  """Starts ``args.processes`` workers on 127.0.0.1; checks they agree."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  with tempfile.TemporaryDirectory() as tmp:
    procs = [
      subprocess.Popen(
        [
          sys.executable,
          os.path.abspath(__file__),
          *argv,
          "--process-id",
          str(i),
          "--coordinator",
          f"127.0.0.1:{port}",
          "--save",
          tmp,
        ],
        stdout=None if i == 0 else subprocess.DEVNULL,
      )
      for i in range(args.processes)
    ]
    codes = [p.wait() for p in procs]
    if max(codes) != 0:
      return max(codes)
    agree = processes_agree(Path(tmp), args.processes)
  print(f"params identical on all {args.processes} processes: {agree}")
  return 0 if agree else 1


def processes_agree(directory: Path, processes: int) -> bool:
  """Every process saved the same final params for every configuration."""
  import numpy as np

  saved = [dict(np.load(directory / f"params_{i}.npz")) for i in range(processes)]
  return all(
    s.keys() == saved[0].keys() and all(np.array_equal(s[k], saved[0][k]) for k in s)
    for s in saved[1:]
  )


def setup_jax(args: argparse.Namespace) -> None:
  import jax

  jax.config.update("jax_num_cpu_devices", DEVICES // args.processes)
  if args.processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      args.coordinator, num_processes=args.processes, process_id=args.process_id
    )


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.processes > 1 and args.process_id is None:
    return launch(args, argv)
  setup_jax(args)
  start = time.perf_counter()
  results = train_all(args)
  if args.process_id in (None, 0):
    print()
    print(markdown_table(results, setup_of(args)))
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
      args.json.write_text(json.dumps(results, indent=2))
    if args.plot:
      plot(results, args.plot)
      print(f"wrote {args.plot}")
  return 0


# ---------------------------------------------------------------------------
# Training


def per_device(tree: Any) -> Any:
  """This device's part -> a leading device axis of size 1 (for ``P("data")``)."""
  import jax

  return jax.tree.map(lambda a: a[None], tree)


def local(tree: Any) -> Any:
  """The inverse of :func:`per_device`, inside ``shard_map``."""
  import jax

  return jax.tree.map(lambda a: a[0], tree)


def make_tx(name: str, setup: Setup) -> Any:
  """The per-device transformation of configuration ``name``."""
  import optax

  from clipjax import distributed

  _, is_diloco, fragments, spec, exchange = CONFIGS[name]
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, setup.lr, setup.warmup, setup.steps, end_value=0.1 * setup.lr
  )
  inner = optax.adamw(schedule, b2=0.95, weight_decay=0.01)
  if not is_diloco:
    return optax.chain(mean_over("data"), inner)
  return distributed.diloco(
    inner,
    optax.sgd(setup.outer_lr, momentum=setup.outer_momentum, nesterov=True),
    sync_every=setup.sync_every,
    axis_name="data",
    compressor=make_compressor(spec),
    feedback="error_feedback",
    fragments=setup.fragments if fragments is None else fragments,
    key=setup.seed,
    exchange=exchange if spec is not None else "auto",
  )


def mean_over(axis_name: str) -> Any:
  """The data-parallel exchange: ``pmean`` of the gradient, no state."""
  import jax
  import optax

  def update(updates, state, params=None):
    del params
    return jax.lax.pmean(updates, axis_name), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_programs(
  tx: Any, is_diloco: bool, loss_fn: Any, mesh: Any, dense_bytes: float
) -> Any:
  """``(init, run_chunk)``: jitted ``shard_map`` programs over ``mesh``.

  ``init(params)`` gives each device its params (the same initial model) and
  state; ``run_chunk(params, state, seqs)`` runs one update per leading entry
  of ``seqs`` (shaped ``(steps, device, batch, context + 1)``) and returns the
  params, the state, the bytes this device sent and the anchor.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import PartitionSpec as P

  from clipjax import distributed

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=P(), out_specs=P("data"))
  def init(params):
    params = jax.lax.pcast(params, "data", to="varying")
    return per_device((params, tx.init(params)))

  @jax.jit
  @jax.shard_map(
    mesh=mesh,
    in_specs=(P("data"), P("data"), P(None, "data")),
    out_specs=P("data"),
  )
  def run_chunk(params, state, seqs):
    params, state = local((params, state))

    def step(carry, batch):
      params, state = carry
      grads = jax.grad(loss_fn)(params, batch[0])  # this device's own
      updates, state = tx.update(grads, state, params)
      if is_diloco:
        sent = distributed.diloco_stats(state)["diloco/bytes_sent"]
      else:  # data parallelism's pmean: a dense float32 all-reduce
        sent = jnp.float32(dense_bytes)
      return (optax.apply_updates(params, updates), state), sent

    (params, state), sent = jax.lax.scan(step, (params, state), seqs)
    anchor = state.anchor if is_diloco else params
    return per_device((params, state, jnp.sum(sent), anchor))

  return init, run_chunk


def train_all(args: argparse.Namespace) -> list[dict[str, Any]]:
  """Trains every configuration of ``args.configs``; one result row each."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P
  from spikes import CharTransformer, Config, load_text, make_loss_fn, windows

  from clipjax import compression, distributed

  setup = setup_of(args)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  n_dev = mesh.size
  train, val, vocab = load_text(setup.max_chars)
  model_config = Config(
    d_model=setup.d_model,
    heads=setup.heads,
    layers=setup.layers,
    context=setup.context,
    seed=setup.seed,
  )
  model = CharTransformer(vocab, model_config, nnx.Rngs(setup.seed))
  graphdef, init_params = nnx.split(model, nnx.Param)
  host_params = jax.tree.map(np.asarray, init_params)
  loss_fn = make_loss_fn(graphdef)

  # Device i trains on the i-th contiguous shard of the text; update t's
  # windows are the same under every configuration.
  shard = len(train) // n_dev
  rng = np.random.default_rng(setup.seed)
  starts = (
    rng.integers(
      0, shard - setup.context - 1, (setup.steps, n_dev, setup.batch_per_device)
    )
    + (np.arange(n_dev) * shard)[None, :, None]
  )
  val_starts = np.random.default_rng(setup.seed + 1).integers(
    0, len(val) - setup.context - 1, (setup.val_batches, 32)
  )
  val_seqs = jnp.asarray(windows(val, val_starts, setup.context))
  val_loss = jax.jit(
    lambda params: jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(params, val_seqs))
  )
  dense = compression.cast(jnp.float32)
  dense_per_step = sum(
    distributed.exchange_bytes(dense, np.shape(x), np.float32, n_dev, "psum")
    for x in jax.tree.leaves(host_params)
  )

  def global_array(host: np.ndarray, spec: P) -> jax.Array:
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

  def on_devices(tree: Any) -> list[Any]:
    """This process's devices' parts of a per-device tree, on the host."""
    count = len(jax.local_devices())
    return [
      jax.tree.map(lambda a, i=i: np.asarray(a.addressable_shards[i].data)[0], tree)
      for i in range(count)
    ]

  results, finals = [], {}
  for name in args.configs.split(","):
    tx = make_tx(name, setup)
    init, run_chunk = make_programs(tx, CONFIGS[name][1], loss_fn, mesh, dense_per_step)
    begin = time.perf_counter()
    params, state = init(jax.tree.map(lambda a: global_array(a, P()), host_params))
    curve = [(0.0, float(val_loss(host_params)))]
    sent_total = 0.0
    for first in range(0, setup.steps, setup.sync_every):
      idx = starts[first : first + setup.sync_every]
      seqs = windows(train, idx, setup.context)  # (chunk, device, batch, ctx+1)
      params, state, sent, anchor = run_chunk(
        params, state, global_array(seqs, P(None, "data"))
      )
      sent_total += float(on_devices(sent)[0])
      curve.append((sent_total, float(val_loss(on_devices(anchor)[0]))))
    seconds = time.perf_counter() - begin
    anchors = on_devices(anchor)
    for other in anchors[1:]:  # the same on every device, bit for bit
      for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(anchors[0]), strict=True):
        if not np.array_equal(a, b):
          raise AssertionError(f"{name}: the devices' anchors differ")
    finals[name] = anchors[0]
    row = {
      "config": name,
      "label": CONFIGS[name][0],
      "val_loss": curve[-1][1],
      "bytes_per_step": sent_total / setup.steps,
      "dense_bytes_per_step": float(dense_per_step),
      "ratio_to_dp": dense_per_step * setup.steps / sent_total,
      "curve": curve,
      "seconds": seconds,
      "devices": n_dev,
      "processes": jax.process_count(),
    }
    if CONFIGS[name][1]:  # what diloco's statistics say a period costs
      stats = on_devices(distributed.diloco_stats(state))[0]
      row["stats_bytes_per_step"] = float(stats["diloco/bytes_per_step"])
      row["stats_ratio"] = float(stats["diloco/ratio"])
    results.append(row)
    if args.process_id in (None, 0):
      print(
        f"{name}: val loss {row['val_loss']:.3f}, {row['bytes_per_step']:,.0f}"
        f" bytes/update, {row['ratio_to_dp']:,.0f}x fewer ({seconds:.0f} s)",
        flush=True,
      )
  if args.save is not None:
    flat = {
      f"{name}{jax.tree_util.keystr(path)}": leaf
      for name, tree in finals.items()
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    np.savez(args.save / f"params_{jax.process_index()}.npz", **flat)
  return results


# ---------------------------------------------------------------------------
# Report


def markdown_table(results: list[dict[str, Any]], setup: Setup) -> str:
  base = next((r for r in results if r["config"] == "data_parallel"), None)
  lines = [
    "| configuration | final val loss | vs data parallel | bytes/update/device"
    " | fewer bytes than data parallel |",
    "|---|---:|---:|---:|---:|",
  ]
  for r in results:
    rel = (
      "" if base is None else f"{100 * (r['val_loss'] / base['val_loss'] - 1):+.1f}%"
    )
    lines.append(
      f"| {r['label']} | {r['val_loss']:.3f} | {rel} | {r['bytes_per_step']:,.0f}"
      f" | {r['ratio_to_dp']:,.0f}x |"
    )
  r0 = results[0]
  tokens = setup.steps * r0["devices"] * setup.batch_per_device * setup.context
  lines += [
    "",
    f"{r0['devices']} devices in {r0['processes']} process(es), {setup.steps}"
    f" updates of {setup.batch_per_device} x {setup.context} bytes per device"
    f" ({tokens:,} tokens per configuration); d_model {setup.d_model},"
    f" {setup.layers} blocks; AdamW (peak {setup.lr:g}, warm-up + cosine);"
    f" H = {setup.sync_every}, Streaming F = {setup.fragments}; outer Nesterov SGD"
    f" ({setup.outer_lr:g}, momentum {setup.outer_momentum:g}).",
    "Validation loss in nats per byte, of the anchor (the params every device"
    " shares); bytes one device sends per update by ring collectives, averaged"
    " over the run.",
  ]
  return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
  from matplotlib.figure import Figure

  fig = Figure(figsize=(8, 5), layout="constrained")
  ax = fig.subplots()
  for r in results:
    sent, loss = zip(*r["curve"][1:], strict=True)
    ax.plot(sent, loss, marker=".", label=f"{r['label']} ({r['ratio_to_dp']:,.0f}x)")
  ax.set(
    xscale="log",
    xlabel="bytes sent per device so far",
    ylabel="validation loss (nats per byte)",
    title="validation loss against communication",
  )
  ax.legend(fontsize="small")
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  sys.exit(main())

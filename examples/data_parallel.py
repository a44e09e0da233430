"""Data-parallel training over a device mesh, dense against compressed exchanges.

An MLP (Flax NNX, 64-256-256-10) learns scikit-learn's digits with 8 workers:
each device holds a slice of every batch, computes its gradient, and a clipjax
chain averages the gradients over the mesh's ``"data"`` axis inside
``jax.shard_map`` before SGD with momentum 0.5 (``--momentum 0.9`` works
too)::

  tx = optax.chain(
    clipjax.distributed.compressed_mean(compressor, "data", feedback=...),
    optax.sgd(learning_rate, momentum=0.5),
  )

The dense baseline is the same chain with the lossless ``cast(float32)``,
which is exactly ``pmean``. Parameters and the SGD state are replicated
(``P()``); inside the step, ``jax.lax.pcast(params, "data", to="varying")``
marks the parameters per-device before ``jax.grad``, so that each device
computes its own gradient (``jax.grad`` of replicated parameters would return
the gradient already summed over the devices). The exchange's state is kept
per device with a leading device axis (``P("data")``), because
error-feedback residuals differ between devices.
The table reports test accuracy and the bytes one device sends per step (ring
all-reduce for summable payloads, all-gather for the others), against dense
float32 all-reduce.

Run on 8 CPU devices of one process::

  python examples/data_parallel.py [--steps 600] [--methods dense,top_k,...]

or as 2 processes x 4 CPU devices on 127.0.0.1, with ``jax.distributed`` and
the gloo CPU collectives (the launcher starts the workers)::

  python examples/data_parallel.py --processes 2

``--save DIR`` writes each process's final parameters to ``DIR/params_<i>.npz``.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

DEVICES = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--batch-per-device", type=int, default=32)
  p.add_argument("--learning-rate", type=float, default=0.05)
  p.add_argument("--momentum", type=float, default=0.5)
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--processes", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--save", default=None, help="directory for params_<i>.npz")
  p.add_argument("--json", default=None, help="write the results table as JSON")
  # Set by the launcher for each worker process.
  p.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


# name -> (compressor factory, feedback, exchange); built after JAX is set up.
METHODS = {
  "dense": ("cast(float32)", None, "auto"),
  "top_k": ("top_k(0.004)", "error_feedback", "auto"),
  "powersgd": ("powersgd(rank=2)", "error_feedback", "auto"),
  "sign": ("sign()", "error_feedback", "auto"),
  "qsgd": ("qsgd(127)", None, "reduce_scatter"),
}


def make_compressor(spec: str) -> Any:
  import jax.numpy as jnp

  from clipjax import compression

  return {
    "cast(float32)": lambda: compression.cast(jnp.float32),
    "top_k(0.004)": lambda: compression.top_k(0.004),
    "powersgd(rank=2)": lambda: compression.powersgd(rank=2),
    "sign()": lambda: compression.sign(),
    "qsgd(127)": lambda: compression.qsgd(127),
  }[spec]()


def launch(args: argparse.Namespace) -> int:
  """Starts ``args.processes`` workers on 127.0.0.1 and waits for them."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  argv = [a for a in sys.argv[1:]]
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
      ],
      stdout=None if i == 0 else subprocess.DEVNULL,
    )
    for i in range(args.processes)
  ]
  codes = [p.wait() for p in procs]
  return max(codes)


def setup_jax(args: argparse.Namespace) -> None:
  import jax

  jax.config.update("jax_num_cpu_devices", DEVICES // args.processes)
  if args.processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      args.coordinator, num_processes=args.processes, process_id=args.process_id
    )


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.processes > 1 and args.process_id is None:
    return launch(args)
  setup_jax(args)
  results = train_all(args)
  if args.process_id in (None, 0):
    print_table(results)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
  return 0


def train_all(args: argparse.Namespace) -> list[dict[str, Any]]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from digits import load_split
  from flax import nnx
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  from clipjax import compression, distributed

  x_train, y_train, x_test, y_test = load_split()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  n_dev = mesh.size
  global_batch = args.batch_per_device * n_dev

  class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.l1 = nnx.Linear(64, 256, rngs=rngs)
      self.l2 = nnx.Linear(256, 256, rngs=rngs)
      self.l3 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
      return self.l3(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))

  graphdef, init_params = nnx.split(MLP(nnx.Rngs(args.seed)), nnx.Param)
  host_params = jax.tree.map(np.asarray, init_params)

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def global_array(host: np.ndarray, spec: P) -> jax.Array:
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

  rng = np.random.default_rng(args.seed)
  batches = [
    rng.choice(len(x_train), global_batch, replace=False) for _ in range(args.steps)
  ]
  results = []
  for name in args.methods.split(","):
    spec, feedback, exchange = METHODS[name]
    compressor = make_compressor(spec)
    exchange_tx = distributed.compressed_mean(
      compressor, "data", feedback=feedback, exchange=exchange, key=args.seed
    )
    tx = optax.chain(
      exchange_tx, optax.sgd(args.learning_rate, momentum=args.momentum or None)
    )
    # The chain's state is (exchange state, sgd state): the first differs per
    # device (residuals), so it is kept with a leading device axis; the second
    # is the same everywhere, so it is replicated.
    state_specs = (P("data"), P())

    def per_device(tree):  # local state -> a leading device axis of size 1
      return jax.tree.map(lambda s: s[None], tree)

    def local(tree):
      return jax.tree.map(lambda s: s[0], tree)

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=P(), out_specs=state_specs)
    def init(params, tx=tx):
      exchange_state, sgd_state = tx.init(params)
      return per_device(exchange_state), sgd_state

    @jax.jit
    @jax.shard_map(
      mesh=mesh,
      in_specs=(P(), state_specs, P("data"), P("data")),
      # bytes_sent and dense_bytes are the same on every device (P()); the
      # residual norm and the density differ per device (P("data")).
      out_specs=(P(), state_specs, (P(), P(), P("data"), P("data"))),
    )
    def step(params, state, x, y, tx=tx):
      # The params enter replicated (P()): jax.grad of them would return the
      # gradient already summed over the devices (a dense all-reduce). Marked
      # per-device, they give this device's own gradient, which the exchange
      # then compresses and averages.
      local_params = jax.lax.pcast(params, "data", to="varying")
      grads = jax.grad(loss_fn)(local_params, x, y)
      state = (local(state[0]), state[1])
      updates, state = tx.update(grads, state, params)
      stats = compression.compression_stats(state)
      sent = sum(v for k, v in stats.items() if k.endswith("/bytes_sent"))
      dense = sum(v for k, v in stats.items() if k.endswith("/dense_bytes"))
      residual = sum(v for k, v in stats.items() if k.endswith("/residual_norm"))
      density = sum(v for k, v in stats.items() if k.endswith("/density"))
      state = (per_device(state[0]), state[1])
      logged = (sent, dense, residual[None], density[None])
      return optax.apply_updates(params, updates), state, logged

    params = jax.tree.map(lambda a: global_array(a, P()), host_params)
    opt_state = init(params)
    start = time.perf_counter()
    for idx in batches:
      xb = global_array(x_train[idx], P("data"))
      yb = global_array(y_train[idx], P("data"))
      params, opt_state, (sent, dense, residual, density) = step(
        params, opt_state, xb, yb
      )
      # One step in flight at a time: XLA:CPU runs each device's program on a
      # shared thread pool, and a deep queue of steps whose collectives wait
      # for each other can exhaust it (a rendezvous timeout).
      jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    local_params = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), params)
    logits = nnx.merge(graphdef, local_params)(jnp.asarray(x_test))
    accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == y_test))
    sent_bytes = float(np.asarray(sent.addressable_data(0)))
    dense_bytes = float(np.asarray(dense.addressable_data(0)))
    # The last step's per-device values, over this process's devices.
    residuals = [float(np.asarray(sh.data)[0]) for sh in residual.addressable_shards]
    densities = [float(np.asarray(sh.data)[0]) for sh in density.addressable_shards]
    results.append(
      {
        "method": name,
        "compressor": spec,
        "feedback": feedback or "none",
        "exchange": exchange
        if exchange != "auto"
        else ("psum" if compressor.summable or compressor.reduce else "all_gather"),
        "test_accuracy": accuracy,
        "bytes_per_step_per_device": sent_bytes,
        "dense_bytes_per_step_per_device": dense_bytes,
        "reduction": dense_bytes / sent_bytes,
        "residual_norm_per_device": residuals,
        "density_per_device": densities,
        "seconds": seconds,
        "devices": n_dev,
        "processes": jax.process_count(),
      }
    )
    if args.save:
      os.makedirs(args.save, exist_ok=True)
      flat = {
        jax.tree_util.keystr(k): v
        for k, v in jax.tree_util.tree_flatten_with_path(local_params)[0]
      }
      np.savez(
        os.path.join(args.save, f"{name}_params_{jax.process_index()}.npz"), **flat
      )
  return results


def print_table(results: list[dict[str, Any]]) -> None:
  r0 = results[0]
  print(
    f"digits, MLP 64-256-256-10, {r0['devices']} devices in {r0['processes']}"
    " process(es); bytes one device sends per step"
  )
  print()
  print("| method | feedback | test accuracy | bytes/step/device | fewer than dense |")
  print("|---|---|---:|---:|---:|")
  for r in results:
    print(
      f"| {r['compressor']} | {r['feedback']} | {r['test_accuracy']:.3f} |"
      f" {r['bytes_per_step_per_device']:,.0f} | {r['reduction']:.1f}x |"
    )


if __name__ == "__main__":
  sys.exit(main())

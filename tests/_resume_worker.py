"""Training worker for tests/test_resume.py, run as a subprocess (not a test module).

Trains a tiny MLP on fixed synthetic data with each optimizer chain of
``CHAINS``; the batch of step ``t`` depends only on ``t``, so a resumed run sees
the batches an uninterrupted one does. Modes (``python _resume_worker.py MODE
DIR``):

- ``full``: trains every chain for ``STEPS`` steps without stopping; writes
  ``DIR/full.npz`` (final params, and the optimizer state after ``SAVE_AT``
  steps, for comparison with what a restore gives).
- ``crash``: trains every chain for ``SAVE_AT`` steps and saves params, optimizer
  state and step with orbax (``DIR/ckpt/<chain>``), prints ``saved``, then keeps
  training, printing ``step <t>`` lines, until the test SIGKILLs it. It never
  returns on its own (exit code 3 if nobody kills it in time).
- ``resume``: restores each chain's checkpoint into the abstract target
  ``jax.eval_shape`` gives, checks the typed state structure came back, trains
  to ``STEPS`` and writes ``DIR/resume.npz``.

``diloco_qsgd`` trains inside ``jax.shard_map`` over ``DEVICES`` CPU devices,
each on its slice of the batch, with params and state per device (a leading
device axis, sharded over the mesh), as ``clipjax.distributed.diloco`` wants.
"""

import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import clipjax
from clipjax import compression

STEPS = 40
SAVE_AT = 17  # after the adaptive clippers' warm-up, mid-way through training
BATCH = 16
DEVICES = 4
CRASH_LIMIT_S = 60.0  # a crash worker still alive this long exits with code 3


def _adam_chain(clipper: optax.GradientTransformation) -> optax.GradientTransformation:
  return optax.chain(clipper, optax.adam(1e-2))


# name -> (factory, whether the update needs standard dtype promotion: optax's
# adam mixes its float32 moments with Python-float hyperparameters).
CHAINS = {
  "zclip_adam": (
    lambda: _adam_chain(clipjax.zclip(max_norm=1.0, warmup_steps=5)),
    True,
  ),
  "autoclip_adam": (
    lambda: _adam_chain(clipjax.autoclip(10.0, window=8)),
    True,
  ),
  "adagc_adam": (
    lambda: _adam_chain(clipjax.adagc(warmup_steps=5)),
    True,
  ),
  "topk_ef_sgd": (
    lambda: optax.chain(
      clipjax.compress(compression.top_k(0.1), feedback="error_feedback", key=0),
      optax.sgd(0.1, momentum=0.9),
    ),
    False,
  ),
  "powersgd_ef_sgd": (
    lambda: optax.chain(
      clipjax.compress(compression.powersgd(2), feedback="error_feedback", key=0),
      optax.sgd(0.1, momentum=0.9),
    ),
    False,
  ),
  "qsgd_sgd": (
    lambda: optax.chain(
      clipjax.compress(compression.qsgd(15, bucket_size=8), feedback=None, key=3),
      optax.sgd(0.05, momentum=0.9),
    ),
    False,
  ),
  "dgc_sgd": (
    lambda: optax.chain(
      clipjax.dgc(0.1, warmup_steps=8, key=1),
      optax.sgd(0.1),
    ),
    False,
  ),
}

# Trained per device over a mesh: name -> factory (no standard promotion needed).
DISTRIBUTED = {
  # Syncs at 5, 10, ... (fragment 0) and 7, 12, 17, ... (fragment 1): the
  # checkpoint after 17 updates holds fragment 0's residuals from update 15.
  "diloco_qsgd": lambda: clipjax.distributed.diloco(
    optax.sgd(0.05, momentum=0.9),
    optax.sgd(0.7, momentum=0.9, nesterov=True),
    sync_every=5,
    axis_name="data",
    compressor=compression.qsgd(127, bucket_size=8),
    fragments=2,
    key=5,
  ),
}

_rng = np.random.default_rng(0)
_X = _rng.normal(size=(256, 8)).astype(np.float32)
_W_TRUE = _rng.normal(size=(8, 1)).astype(np.float32)
_Y = (np.tanh(_X @ _W_TRUE) + 0.1 * _rng.normal(size=(256, 1))).astype(np.float32)
_Y[::37] *= 25.0  # outliers: gradient spikes for the clippers to act on


def init_params() -> dict[str, jax.Array]:
  rng = np.random.default_rng(1)
  return {
    "w1": jnp.asarray(0.5 * rng.normal(size=(8, 16)), jnp.float32),
    "b1": jnp.zeros((16,), jnp.float32),
    "w2": jnp.asarray(0.5 * rng.normal(size=(16, 1)), jnp.float32),
    "b2": jnp.zeros((1,), jnp.float32),
  }


def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
  idx = np.random.default_rng(1000 + step).choice(len(_X), BATCH, replace=False)
  return _X[idx], _Y[idx]


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  pred = h @ params["w2"] + params["b2"]
  return jnp.mean((pred - y) ** 2)


def make_step(tx: optax.GradientTransformation, standard: bool):
  @jax.jit
  def step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    with jax.numpy_dtype_promotion("standard" if standard else "strict"):
      updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def make_mesh_chain(tx: optax.GradientTransformation):
  """``(init, step)`` with params and state per device (leading axis, sharded)."""
  mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("data",))

  def per_device(tree):
    return jax.tree.map(lambda a: a[None], tree)

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=P(), out_specs=P("data"))
  def init(params):
    params = jax.lax.pcast(params, "data", to="varying")
    return per_device((params, tx.init(params)))

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=P("data"), out_specs=P("data"))
  def step(params, opt_state, x, y):  # x, y: this device's slice of the batch
    params, opt_state = jax.tree.map(lambda a: a[0], (params, opt_state))
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return per_device((optax.apply_updates(params, updates), opt_state))

  return init, step


def begin(name: str):
  """``(step_fn, params, opt_state)`` of a chain, before its first step."""
  if name in DISTRIBUTED:
    init, step_fn = make_mesh_chain(DISTRIBUTED[name]())
    return (step_fn, *init(init_params()))
  factory, standard = CHAINS[name]
  tx = factory()
  return make_step(tx, standard), init_params(), tx.init(init_params())


NAMES = (*CHAINS, *DISTRIBUTED)


def train(step_fn, params, opt_state, start: int, stop: int):
  for t in range(start, stop):
    params, opt_state = step_fn(params, opt_state, *batch(t))
  return params, opt_state


def flat(prefix: str, tree) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {f"{prefix}{jax.tree_util.keystr(p)}": np.asarray(v) for p, v in leaves}


def run_full(out: str) -> None:
  arrays = {}
  for name in NAMES:
    step_fn, params, opt_state = begin(name)
    params, opt_state = train(step_fn, params, opt_state, 0, SAVE_AT)
    arrays |= flat(f"{name}/saved_state", opt_state)
    params, _ = train(step_fn, params, opt_state, SAVE_AT, STEPS)
    arrays |= flat(f"{name}/params", params)
  np.savez(os.path.join(out, "full.npz"), **arrays)


def run_crash(out: str) -> None:
  checkpointer = ocp.StandardCheckpointer()
  live = []
  for name in NAMES:
    step_fn, params, opt_state = begin(name)
    params, opt_state = train(step_fn, params, opt_state, 0, SAVE_AT)
    checkpointer.save(
      os.path.join(out, "ckpt", name),
      {"params": params, "opt_state": opt_state, "step": jnp.int32(SAVE_AT)},
    )
    live.append((step_fn, params, opt_state))
  checkpointer.wait_until_finished()  # committed: a kill from here on loses nothing
  print("saved", flush=True)
  # Keep training (and changing the in-memory state) until killed mid-run.
  start = time.monotonic()
  t = SAVE_AT
  while time.monotonic() - start < CRASH_LIMIT_S:
    live = [(f, *train(f, p, s, t, t + 1)) for f, p, s in live]
    t += 1
    print("step", t, flush=True)
  sys.exit(3)


def run_resume(out: str) -> None:
  checkpointer = ocp.StandardCheckpointer()
  arrays = {}
  for name in NAMES:
    step_fn, params, opt_state = begin(name)
    target = {"params": params, "opt_state": opt_state, "step": jnp.int32(0)}
    abstract = jax.eval_shape(lambda target=target: target)
    restored = checkpointer.restore(os.path.join(out, "ckpt", name), abstract)
    want, got = jax.tree.structure(abstract), jax.tree.structure(restored)
    if want != got:
      raise AssertionError(f"{name}: restored structure {got} != {want}")
    for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(restored), strict=True):
      if (a.shape, a.dtype) != (r.shape, r.dtype):
        raise AssertionError(f"{name}: restored {r.shape} {r.dtype} != {a}")
    start = int(restored["step"])
    arrays |= flat(f"{name}/saved_state", restored["opt_state"])
    params, _ = train(step_fn, restored["params"], restored["opt_state"], start, STEPS)
    arrays |= flat(f"{name}/params", params)
  checkpointer.close()
  np.savez(os.path.join(out, "resume.npz"), **arrays)


if __name__ == "__main__":
  # Here, not at import: pytest's --doctest-modules imports this file, and a
  # device count set then would become the whole suite's (4 instead of 8).
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  jax.config.update("jax_num_cpu_devices", DEVICES)  # for diloco's mesh
  warnings.simplefilter("error")
  mode, directory = sys.argv[1], sys.argv[2]
  {"full": run_full, "crash": run_crash, "resume": run_resume}[mode](directory)

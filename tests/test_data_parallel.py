"""examples/data_parallel.py as 2 processes x 4 devices, against an oracle.

The oracle is computed here on one device, without ``shard_map`` or the
exchange: each of the 8 workers' gradients by ``jax.grad`` on its slice of the
batch, their mean (dense) or numpy's error feedback and top-k per worker, then
``optax.sgd``. A recipe that handed the exchange an already-summed gradient
(8 times the mean) or the same payload from every device fails it.
"""

import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _run import run

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE = EXAMPLES / "data_parallel.py"
STEPS, BATCH_PER_DEVICE, WORKERS, SEED = 5, 32, 8, 0
LR, MOMENTUM, RATIO = 0.05, 0.5, 0.004


def _run(out, *args):
  return run(
    sys.executable,
    EXAMPLE,
    "--steps",
    str(STEPS),
    "--methods",
    "dense,top_k",
    "--save",
    out,
    *args,
  )


def _top_k_with_error_feedback(g, residual):
  """numpy: send the k = ceil(ratio n) largest |g + e|, keep the rest as e."""
  x = g + residual
  flat = x.ravel()
  k = max(1, math.ceil(round(RATIO * flat.size, 6)))
  keep = np.argsort(-np.abs(flat), kind="stable")[:k]
  sent = np.zeros_like(flat)
  sent[keep] = flat[keep]
  sent = sent.reshape(x.shape)
  return sent, x - sent


def _oracle(method):
  """The example's training, one worker at a time on one device."""
  sys.path.insert(0, str(EXAMPLES))
  try:
    from digits import load_split
  finally:
    sys.path.remove(str(EXAMPLES))
  from flax import nnx

  x_train, y_train, _, _ = load_split()

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(64, 256, rngs=rngs)
      self.l2 = nnx.Linear(256, 256, rngs=rngs)
      self.l3 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
      return self.l3(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))

  graphdef, params = nnx.split(MLP(nnx.Rngs(SEED)), nnx.Param)

  @jax.jit
  def grad_fn(params, x, y):
    def loss(p):
      logits = nnx.merge(graphdef, p)(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.grad(loss)(params)

  rng = np.random.default_rng(SEED)
  batches = [
    rng.choice(len(x_train), BATCH_PER_DEVICE * WORKERS, replace=False)
    for _ in range(STEPS)
  ]
  opt = optax.sgd(LR, momentum=MOMENTUM)
  opt_state = opt.init(params)
  leaves, treedef = jax.tree.flatten(params)
  residuals = [[np.zeros(np.shape(p), np.float32) for p in leaves]] * WORKERS
  for idx in batches:
    grads = [
      [np.asarray(g) for g in jax.tree.leaves(grad_fn(params, xs, ys))]
      for xs, ys in zip(
        np.split(x_train[idx], WORKERS), np.split(y_train[idx], WORKERS), strict=True
      )
    ]
    if method == "dense":
      sent = grads
    else:
      pairs = [
        [_top_k_with_error_feedback(g, e) for g, e in zip(gs, es, strict=True)]
        for gs, es in zip(grads, residuals, strict=True)
      ]
      sent = [[s for s, _ in worker] for worker in pairs]
      residuals = [[e for _, e in worker] for worker in pairs]
    mean = [np.mean(parts, axis=0) for parts in zip(*sent, strict=True)]
    updates, opt_state = opt.update(
      jax.tree.unflatten(treedef, [jnp.asarray(m) for m in mean]), opt_state
    )
    params = optax.apply_updates(params, updates)
  return {
    jax.tree_util.keystr(k): np.asarray(v)
    for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }, residuals


def test_two_processes_train_as_the_one_device_oracle(tmp_path):
  table = _run(tmp_path, "--processes", "2", "--json", str(tmp_path / "r.json"))
  logged = {r["method"]: r for r in json.loads((tmp_path / "r.json").read_text())}
  assert "8 devices in 2 process(es)" in table
  assert "| top_k(0.004) | error_feedback |" in table and "30.8x" in table
  for method in ("dense", "top_k"):
    p0 = np.load(tmp_path / f"{method}_params_0.npz")
    p1 = np.load(tmp_path / f"{method}_params_1.npz")
    expected, residuals = _oracle(method)
    assert sorted(p0) == sorted(expected) and len(expected) == 6
    for k in expected:
      np.testing.assert_array_equal(p0[k], p1[k])  # both processes agree exactly
      # gloo and the in-process sums add in different orders.
      np.testing.assert_allclose(p0[k], expected[k], rtol=1e-5, atol=1e-6)
    # Each worker keeps its own residual; process 0 logged its 4 devices'.
    norms = [np.sqrt(sum(np.sum(e**2) for e in es)) for es in residuals]
    got = logged[method]["residual_norm_per_device"]
    np.testing.assert_allclose(got, norms[: len(got)], rtol=1e-4, atol=1e-6)
    if method == "top_k":
      assert len(got) == 4 and len(set(got)) == 4

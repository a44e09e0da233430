"""compressed_mean on 8 CPU devices against single-process simulations of 8 workers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clipjax import compression, distributed

N = 8


def _mesh():
  return Mesh(np.array(jax.devices()[:N]), ("data",))


def _grads(seed=0, shape=(6, 20)):
  """One gradient per worker, stacked: ``(N, *shape)``, of varied scales."""
  g = jax.random.normal(jax.random.key(seed), (N, *shape), jnp.float32)
  scale = jnp.geomspace(0.5, 4.0, N, dtype=jnp.float32)
  return g * scale.reshape(N, *[1] * len(shape))


def run_on_mesh(tx, grads, steps=1):
  """Runs ``steps`` updates on 8 devices; returns each device's updates and bytes."""

  @jax.jit
  @jax.shard_map(mesh=_mesh(), in_specs=P("data"), out_specs=(P("data"), P("data")))
  def run(g):
    g = g[0]
    state = tx.init(g)
    outs = []
    for _ in range(steps):
      u, state = tx.update(g, state)
      outs.append(u)
    sent = compression.compression_stats(state)
    sent = next(v for k, v in sent.items() if k.endswith("/bytes_sent"))
    return jnp.stack(outs)[None], sent[None]

  updates, sent = run(grads)
  return np.asarray(updates), np.asarray(sent)


def _leaf_key(seed, step):
  """The key compress and compressed_mean give the first leaf at ``step``."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), step), 0)


def simulate(compressor, grads, steps=1, feedback=True, seed=0):
  """8 workers in a Python loop: error feedback, encode, exchange, decode, mean."""
  n = grads.shape[0]
  shape, dtype = grads.shape[1:], grads.dtype
  residual = [jnp.zeros(shape, jnp.float32) for _ in range(n)]
  cs = compressor.init(shape, dtype)
  out = []
  for step in range(steps):
    key = _leaf_key(seed, step)
    xs = [grads[i] + residual[i] if feedback else grads[i] for i in range(n)]
    per_worker = compressor.stochastic and not compressor.summable
    keys = [jax.random.fold_in(key, i) if per_worker else key for i in range(n)]
    payloads = [compressor.encode(x, cs, k)[0] for x, k in zip(xs, keys, strict=True)]
    decoded = [
      compressor.decode(p, shape, dtype, cs, k)
      for p, k in zip(payloads, keys, strict=True)
    ]
    if compressor.summable:
      mean_payload = jax.tree.map(lambda *ps: sum(ps) / n, *payloads)
      mean_hat = compressor.decode(mean_payload, shape, dtype, cs, key)
    else:
      mean_hat = sum(decoded) / n
    residual = [x - d for x, d in zip(xs, decoded, strict=True)]
    out.append(np.asarray(mean_hat))
  return np.stack(out)


LOSSY = {
  "top_k": compression.top_k(0.1),
  "sign": compression.sign(),
  "qsgd": compression.qsgd(15, bucket_size=32),
  "terngrad": compression.terngrad(),
  "natural": compression.natural(),
  "random_k": compression.random_k(0.25),
  "cast_bf16": compression.cast(jnp.bfloat16),
}


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_each_compressor_equals_a_simulation_of_8_workers(name):
  compressor = LOSSY[name]
  grads = _grads()
  tx = distributed.compressed_mean(compressor, "data")
  updates, sent = run_on_mesh(tx, grads, steps=2)
  expected = simulate(compressor, grads, steps=2)
  for device in range(N):  # every device holds the same mean
    np.testing.assert_array_equal(updates[device], updates[0])
  # A bfloat16 payload is summed in bfloat16 by the all-reduce, in its own order.
  tol = 2e-2 if name == "cast_bf16" else 1e-5
  np.testing.assert_allclose(updates[0], expected, rtol=tol, atol=tol)
  exchange = "psum" if compressor.summable else "all_gather"
  assert sent[0] == distributed.exchange_bytes(
    compressor, grads.shape[1:], grads.dtype, N, exchange
  )


def test_lossless_compressor_equals_pmean():
  grads = _grads()
  tx = distributed.compressed_mean(compression.cast(jnp.float32), "data")
  updates, sent = run_on_mesh(tx, grads)
  np.testing.assert_allclose(updates[0, 0], grads.mean(axis=0), rtol=1e-6, atol=1e-7)
  dense = grads[0].size * 4
  assert sent[0] == 2 * (N - 1) * dense // N


def test_powersgd_equals_the_power_iteration_over_averaged_factors():
  """Rank 2, one power iteration: P = mean(M_i Q) orthonormalised, Q = mean(M_i^T P)."""
  grads = _grads(shape=(12, 16))
  compressor = compression.powersgd(2)
  tx = distributed.compressed_mean(compressor, "data", feedback=None)
  updates, sent = run_on_mesh(tx, grads)
  q = compressor.init(grads.shape[1:], grads.dtype)
  m = np.asarray(grads, np.float64)
  p = np.mean([mi @ np.asarray(q, np.float64) for mi in m], axis=0)
  p, _ = np.linalg.qr(p)
  q_new = np.mean([mi.T @ p for mi in m], axis=0)
  np.testing.assert_allclose(updates[0, 0], p @ q_new.T, rtol=1e-4, atol=1e-5)
  for device in range(N):
    np.testing.assert_array_equal(updates[device], updates[0])
  factors = (12 + 16) * 2 * 4
  assert sent[0] == 2 * (N - 1) * factors // N


def test_reduce_scatter_moves_fewer_bytes_and_matches_its_simulation():
  compressor = compression.sign()
  grads = _grads(shape=(8000,))
  gather = distributed.compressed_mean(compressor, "data", feedback=None)
  scatter = distributed.compressed_mean(
    compressor, "data", feedback=None, exchange="reduce_scatter"
  )
  (u1, sent1), (u2, sent2) = run_on_mesh(gather, grads), run_on_mesh(scatter, grads)
  assert sent2[0] < sent1[0] / 3
  for device in range(N):
    np.testing.assert_array_equal(u2[device], u2[0])
  # Simulation: chunk, compress, average chunk j over workers, compress, join.
  key = _leaf_key(0, 0)
  chunk = (8000 + N - 1) // N
  flat = jnp.pad(grads, ((0, 0), (0, chunk * N - 8000))).reshape(N, N, chunk)
  keys = [jax.random.fold_in(key, j) for j in range(N)]

  def roundtrip(v, k):
    return compressor.decode(compressor.encode(v, (), k)[0], (chunk,), v.dtype, (), k)

  joined = []
  for j in range(N):
    mean_chunk = sum(roundtrip(flat[i, j], keys[j]) for i in range(N)) / N
    second = jax.random.fold_in(jax.random.fold_in(key, N), j)
    joined.append(roundtrip(mean_chunk, second))
  expected = jnp.concatenate(joined)[:8000]
  np.testing.assert_allclose(u2[0, 0], expected, rtol=1e-6)
  # Close to the all_gather mean in direction (both are sign estimates).
  cos = np.dot(u1[0, 0], u2[0, 0]) / np.linalg.norm(u1[0, 0]) / np.linalg.norm(u2[0, 0])
  assert cos > 0.5


def test_deterministic_given_the_seed_and_ef21_runs():
  grads = _grads()
  for feedback in ("error_feedback", "ef21", None):
    tx = distributed.compressed_mean(
      compression.qsgd(7), "data", feedback=feedback, key=3
    )
    a, _ = run_on_mesh(tx, grads, steps=2)
    b, _ = run_on_mesh(tx, grads, steps=2)
    np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(a))


def test_chains_with_an_optimizer_under_shard_map():
  grads = _grads()
  tx = optax.chain(
    distributed.compressed_mean(compression.top_k(0.2), "data"), optax.sgd(0.1)
  )
  updates, _ = run_on_mesh(tx, grads)
  expected = -0.1 * simulate(compression.top_k(0.2), grads)
  chex.assert_trees_all_close(updates[0], expected, rtol=1e-6)


def test_errors():
  with pytest.raises(
    ValueError, match=r"exchange='psum'.*'top_k' payloads cannot be summed"
  ):
    distributed.compressed_mean(compression.top_k(0.1), "data", exchange="psum")
  with pytest.raises(ValueError, match=r"exchange='gossip'"):
    distributed.compressed_mean(compression.sign(), "data", exchange="gossip")
  with pytest.raises(ValueError, match=r"'powersgd' runs its own rounds"):
    distributed.compressed_mean(compression.powersgd(1), "data", exchange="all_gather")
  with pytest.raises(TypeError, match="must be a Compressor"):
    distributed.compressed_mean("top_k", "data")
  tx = distributed.compressed_mean(compression.sign(), "batch")
  with pytest.raises(ValueError, match=r"axis_name='batch'.*no mesh axis"):
    run_on_mesh(tx, _grads())


def test_dgc_across_devices_equals_8_single_process_workers_with_the_per_worker_bound():
  """Each worker clips to C / sqrt(8), runs DGC alone; the update is their mean."""
  grads = _grads(shape=(40,))
  bound = 2.0
  tx = compression.dgc(
    0.25, momentum=0.5, clip_norm=bound, selection="exact", axis_name="data"
  )
  updates, _ = run_on_mesh(tx, grads, steps=3)
  expected = []
  for i in range(N):
    worker = compression.dgc(
      0.25, momentum=0.5, clip_norm=bound / np.sqrt(N), selection="exact"
    )
    state = worker.init(grads[i])
    steps = []
    for _ in range(3):
      u, state = worker.update(grads[i], state)
      steps.append(u)
    expected.append(np.stack(steps))
  np.testing.assert_allclose(
    updates[0], np.mean(expected, axis=0), rtol=1e-5, atol=1e-7
  )
  for device in range(N):
    np.testing.assert_array_equal(updates[device], updates[0])


def test_bytes_received_equal_bytes_sent_for_ring_collectives():
  grads = _grads()
  tx = distributed.compressed_mean(compression.sign(), "data")

  @jax.jit
  @jax.shard_map(mesh=_mesh(), in_specs=P("data"), out_specs=P())
  def stats(g):
    _, state = tx.update(g[0], tx.init(g[0]))
    s = compression.compression_stats(state)
    return jnp.stack([s["sign/bytes_sent"], s["sign/bytes_received"], s["sign/ratio"]])

  sent, received, ratio = np.asarray(stats(grads))
  assert sent == received == 7 * compression.sign().payload_bytes((6, 20), jnp.float32)
  dense = 2 * 7 * 120 * 4 // 8
  np.testing.assert_allclose(ratio, dense / sent, rtol=1e-6)

"""compressed_mean on 8 CPU devices against single-process simulations of 8 workers."""

import math

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


def test_stochastic_ef21_and_no_feedback_are_deterministic_given_the_seed():
  # error_feedback with qsgd is checked against a simulation above, EF21's
  # arithmetic against numpy below; here its stochastic runs repeat and agree.
  grads = _grads()
  for feedback in ("ef21", None):
    tx = distributed.compressed_mean(
      compression.qsgd(7), "data", feedback=feedback, key=3
    )
    a, _ = run_on_mesh(tx, grads, steps=2)
    b, _ = run_on_mesh(tx, grads, steps=2)
    np.testing.assert_array_equal(a, b)
    _assert_devices_agree(a)
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


# -- several steps, a gradient per step and device, against numpy -----------------


def _step_grads(seed, shape, steps=4):
  """``(N, steps, *shape)``: a drifting gradient per device, new at every step."""
  base = np.asarray(_grads(seed, shape))[:, None]
  noise = np.asarray(jax.random.normal(jax.random.key(seed + 1), (N, steps, *shape)))
  return (base + 0.5 * noise).astype(np.float32)


def run_steps(tx, grads):
  """Device ``i`` updates with entry ``[i, t]`` of each leaf of ``grads`` at step ``t``.

  Returns each device's updates, stacked ``(N, steps, ...)``, and its last state.
  """
  steps = jax.tree.leaves(grads)[0].shape[1]

  @jax.jit
  @jax.shard_map(mesh=_mesh(), in_specs=P("data"), out_specs=P("data"))
  def run(g):
    state = tx.init(jax.tree.map(lambda t: t[0, 0], g))
    outs = []
    for t in range(steps):
      u, state = tx.update(jax.tree.map(lambda a, t=t: a[0, t], g), state)
      outs.append(u)
    stacked = jax.tree.map(lambda *us: jnp.stack(us)[None], *outs)
    return stacked, jax.tree.map(lambda s: jnp.asarray(s)[None], state)

  updates, state = run(grads)
  return jax.tree.map(np.asarray, updates), jax.tree.map(np.asarray, state)


def _numpy_top_k(x, ratio):
  """The ``ceil(ratio * n)`` entries of largest magnitude kept, the rest zero."""
  flat = x.ravel()
  k = max(1, math.ceil(round(ratio * flat.size, 6)))  # 0.07 * 100 keeps 7
  keep = np.argsort(-np.abs(flat), kind="stable")[:k]
  out = np.zeros_like(flat)
  out[keep] = flat[keep]
  return out.reshape(x.shape)


def _assert_devices_agree(updates):
  for leaf in jax.tree.leaves(updates):
    for device in range(N):
      np.testing.assert_array_equal(leaf[device], leaf[0])


def test_ef21_across_devices_equals_a_numpy_simulation_of_8_workers():
  """EF21 (Richtarik et al. 2021, Algorithm 2) with exact top-k, 4 steps.

  Worker i keeps g_i and sends c_i = C(grad_i - g_i); g_i += c_i; every worker
  adds mean_i c_i to the shared G, which is the update.
  """
  ratio = 0.1
  grads = _step_grads(5, (6, 20))
  tx = distributed.compressed_mean(compression.top_k(ratio), "data", feedback="ef21")
  updates, state = run_steps(tx, grads)
  own = np.zeros_like(grads[:, 0])  # g_i, float32 like clipjax's state
  shared = np.zeros(grads.shape[2:], np.float64)
  for t in range(grads.shape[1]):
    sent = np.stack([_numpy_top_k(grads[i, t] - own[i], ratio) for i in range(N)])
    own = own + sent
    shared = shared + sent.mean(axis=0, dtype=np.float64)
    for device in range(N):
      np.testing.assert_allclose(updates[device, t], shared, rtol=1e-5, atol=1e-6)
  _assert_devices_agree(updates)
  # Each device keeps its own estimate (float32 sums of float32 entries: exact)
  # beside the shared one, which all devices hold alike.
  np.testing.assert_array_equal(state.feedback["estimate"], own)
  assert not np.array_equal(own[0], own[1])
  _assert_devices_agree(state.feedback["shared"])
  np.testing.assert_allclose(state.feedback["shared"][0], shared, 1e-5, 1e-6)


def test_dgc_across_devices_equals_a_numpy_simulation_with_clipping_and_momentum():
  """DGC (Lin et al. 2018) on 8 workers over 4 steps, a two-leaf tree.

  Per worker: clip the whole tree to C / sqrt(8) by global norm; u = m u + g;
  v += u; send top_k(v) per leaf; zero u and v where sent. The update is the
  mean of the sent parts.
  """
  ratio, momentum, bound = 0.25, 0.9, 20.0
  grads = {"w": _step_grads(7, (30,)), "b": _step_grads(9, (10,))}
  tx = compression.dgc(
    ratio, momentum=momentum, clip_norm=bound, selection="exact", axis_name="data"
  )
  updates, _ = run_steps(tx, grads)
  per_worker = bound / np.sqrt(N)
  g64 = {k: v.astype(np.float64) for k, v in grads.items()}
  norms = np.sqrt(sum(np.sum(g**2, axis=-1) for g in g64.values()))  # (N, steps)
  assert norms.min() < per_worker < norms.max()  # some clipped, some not
  u = {k: np.zeros_like(g[:, 0]) for k, g in g64.items()}
  v = {k: np.zeros_like(g[:, 0]) for k, g in g64.items()}
  for t in range(4):
    for leaf, g in g64.items():
      sent = np.zeros_like(g[:, 0])
      for i in range(N):
        clipped = g[i, t] * min(1.0, per_worker / norms[i, t])
        u[leaf][i] = momentum * u[leaf][i] + clipped
        v[leaf][i] = v[leaf][i] + u[leaf][i]
        sent[i] = _numpy_top_k(v[leaf][i], ratio)
        where = sent[i] != 0
        u[leaf][i][where] = 0.0
        v[leaf][i][where] = 0.0
      for device in range(N):
        np.testing.assert_allclose(
          updates[leaf][device, t], sent.mean(axis=0), rtol=1e-5, atol=1e-6
        )
  _assert_devices_agree(updates)


# -- gradients from jax.grad of replicated parameters, as users compute them -------


def _regression(seed=0):
  kx, ky, kw = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (N * 4, 5), jnp.float32)
  y = jax.random.normal(ky, (N * 4, 3), jnp.float32)
  params = {"w": jax.random.normal(kw, (5, 3), jnp.float32), "b": jnp.ones((3,))}
  return params, x, y


def _loss(params, x, y):
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _per_device_grads(params, x, y):
  """Device i's gradient on its 4 rows, on one device, outside shard_map."""
  grad = jax.jit(jax.grad(_loss))
  per = [grad(params, x[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4]) for i in range(N)]
  return {k: np.stack([np.asarray(p[k]) for p in per]) for k in params}


def _grad_step(tx, pcast=True):
  """One update from jax.grad of parameters that enter shard_map replicated."""

  @jax.jit
  @jax.shard_map(
    mesh=_mesh(), in_specs=(P(), P("data"), P("data")), out_specs=(P(), P("data"))
  )
  def step(params, x, y):
    if pcast:
      params = jax.lax.pcast(params, "data", to="varying")
    g = jax.grad(_loss)(params, x, y)
    u, state = tx.update(g, tx.init(g))
    return u, jax.tree.map(lambda r: r[None], state.feedback)

  return step


def test_lossless_mean_of_jax_grad_equals_the_mean_of_per_device_gradients():
  params, x, y = _regression()
  tx = distributed.compressed_mean(compression.cast(jnp.float32), "data", feedback=None)
  update, _ = _grad_step(tx)(params, x, y)
  expected = _per_device_grads(params, x, y)
  for k in params:
    np.testing.assert_allclose(update[k], expected[k].mean(0), rtol=1e-6, atol=1e-7)
  # The mean of the local gradients is the gradient of the whole batch.
  whole = jax.grad(_loss)(params, x, y)
  chex.assert_trees_all_close(update, whole, rtol=1e-5, atol=1e-6)


def test_error_feedback_residuals_of_jax_grad_are_per_device():
  params, x, y = _regression(1)
  tx = distributed.compressed_mean(compression.top_k(0.2), "data")
  update, residual = _grad_step(tx)(params, x, y)
  grads = _per_device_grads(params, x, y)
  for k in params:
    sent = np.stack([_numpy_top_k(g, 0.2) for g in grads[k]])
    np.testing.assert_allclose(residual[k], grads[k] - sent, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(update[k], sent.mean(0), rtol=1e-5, atol=1e-6)
    assert not any(np.array_equal(residual[k][0], r) for r in residual[k][1:])


@pytest.mark.parametrize("call", ["compressed_mean", "dgc"])
def test_replicated_params_without_pcast_are_an_error(call):
  if call == "dgc":
    tx = compression.dgc(0.2, clip_norm=1.0, axis_name="data")
  else:
    tx = distributed.compressed_mean(compression.top_k(0.2), "data")
  params, x, y = _regression()
  with pytest.raises(ValueError, match=rf"{call}\(axis_name='data'\).*already summed"):
    _grad_step(tx, pcast=False).trace(params, x, y)

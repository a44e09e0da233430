"""DeMo: dct_top_k, error feedback with a decay, and distributed.demo, against numpy.

The compressor's exact bytes against its payload's arrays and a formula; its
coefficients, their selection and their decoding against an explicit float64
DCT-II in numpy (itself checked against an FFT); the round trip with
``k == chunk_size`` as the identity; jit and vmap; the decaying residual's
recursion over several steps; ``feedback=`` given as a ``Feedback``; and the
whole optimizer on 8 devices against a numpy simulation of 8 workers
(momentum, DCT, top-k, subtraction, mean, sign, weight decay).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clipjax import compression as C
from clipjax import distributed

KEY = jax.random.PRNGKey(0)
F32, BF16 = np.float32, jnp.bfloat16
SHAPE = (37, 29)  # 1073 elements: not a multiple of any chunk size used here
N_DEVICES = 8


def _ceil(a, b):
  return -(-a // b)


# -- numpy references -----------------------------------------------------------------


def np_dct(rows):
  """The orthonormal DCT-II of each row, by its defining sum, in float64:
  ``X_f = s_f sum_j x_j cos(pi (2j + 1) f / (2n))``."""
  rows = np.asarray(rows, np.float64)
  n = rows.shape[-1]
  out = np.zeros_like(rows)
  for f in range(n):
    scale = math.sqrt((1.0 if f == 0 else 2.0) / n)
    for j in range(n):
      out[..., f] += (
        scale * math.cos(math.pi * (2 * j + 1) * f / (2 * n)) * rows[..., j]
      )
  return out


def np_idct(coefs):
  """Its inverse, the orthonormal DCT-III, by its defining sum, in float64."""
  coefs = np.asarray(coefs, np.float64)
  n = coefs.shape[-1]
  out = np.zeros_like(coefs)
  for j in range(n):
    for f in range(n):
      scale = math.sqrt((1.0 if f == 0 else 2.0) / n)
      out[..., j] += (
        scale * math.cos(math.pi * (2 * j + 1) * f / (2 * n)) * coefs[..., f]
      )
  return out


def np_dct_by_fft(rows):
  """The same transform by Makhoul's FFT algorithm (as DeMo's reference
  computes it): even entries, then odd ones reversed, an FFT, a twiddle."""
  rows = np.asarray(rows, np.float64)
  n = rows.shape[-1]
  v = np.concatenate([rows[..., ::2], rows[..., 1::2][..., ::-1]], axis=-1)
  f = np.arange(n)
  out = 2 * np.real(np.exp(-1j * np.pi * f / (2 * n)) * np.fft.fft(v, axis=-1))
  out[..., 0] *= math.sqrt(1.0 / (4 * n))
  out[..., 1:] *= math.sqrt(1.0 / (2 * n))
  return out


def np_chunks(x, chunk):
  flat = np.asarray(x, np.float64).ravel()
  c = _ceil(flat.size, chunk)
  padded = np.zeros(c * chunk)
  padded[: flat.size] = flat
  return padded.reshape(c, chunk)


def np_unpack(packed, bits, n):
  """The documented bit stream: code i in bits [i * bits, (i + 1) * bits)."""
  stream = np.unpackbits(np.asarray(packed), bitorder="little")
  assert stream.size == _ceil(n * bits, 8) * 8 and not stream[n * bits :].any()
  fields = stream[: n * bits].reshape(n, bits).astype(np.int64)
  return (fields << np.arange(bits)).sum(axis=1)


def np_dct_top_k(x, k, chunk):
  """What a worker sends of ``x``, decoded: the k largest coefficients of each
  chunk's DCT, inverted, in float64."""
  coefs = np_dct(np_chunks(x, chunk))
  keep = np.argsort(-np.abs(coefs), axis=1, kind="stable")[:, :k]
  sparse = np.zeros_like(coefs)
  np.put_along_axis(sparse, keep, np.take_along_axis(coefs, keep, axis=1), axis=1)
  return np_idct(sparse).ravel()[: np.size(x)].reshape(np.shape(x))


def test_the_numpy_dct_is_orthonormal_and_agrees_with_an_fft():
  rows = np.random.default_rng(0).normal(size=(5, 12))
  np.testing.assert_allclose(np_dct(rows), np_dct_by_fft(rows), atol=1e-12)
  np.testing.assert_allclose(np_idct(np_dct(rows)), rows, atol=1e-12)
  np.testing.assert_allclose(
    np.linalg.norm(np_dct(rows), axis=1), np.linalg.norm(rows, axis=1)
  )


# -- the compressor -------------------------------------------------------------------


def formula(n, k, chunk, itemsize):
  """``c k itemsize + ceil(c k ceil(log2 chunk) / 8)`` for ``c`` chunks."""
  m = _ceil(n, chunk) * k
  return m * itemsize + _ceil(m * math.ceil(math.log2(chunk)), 8)


@pytest.mark.parametrize(
  "k, chunk, shape, dtype, value_dtype",
  [
    (32, 64, SHAPE, F32, None),
    (32, 64, (64, 1024), F32, None),
    (3, 100, SHAPE, F32, None),
    (1, 2, (7,), F32, None),
    (64, 64, (1,), F32, None),
    (5, 16, SHAPE, F32, BF16),
    (5, 16, SHAPE, BF16, None),
    (5, 16, SHAPE, BF16, F32),
  ],
)
def test_exact_bytes_match_the_payload_and_the_formula(
  k, chunk, shape, dtype, value_dtype
):
  c = C.dct_top_k(k, chunk_size=chunk, value_dtype=value_dtype)
  x = jax.random.normal(KEY, shape).astype(dtype)
  payload, _ = jax.jit(c.encode)(x, c.init(shape, dtype), KEY)
  held = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(payload))
  itemsize = np.dtype(dtype if value_dtype is None else value_dtype).itemsize
  want = formula(math.prod(shape), k, chunk, itemsize)
  assert held == c.payload_bytes(shape, dtype) == want
  assert payload["values"].dtype == (dtype if value_dtype is None else value_dtype)
  assert payload["indices"].dtype == np.uint8
  assert (c.summable, c.stochastic, c.unbiased, c.reduce) == (False, False, False, None)


def test_defaults_send_deMos_density():
  c = C.dct_top_k()
  n = 128 * 1024
  # One float32 value and one 7-bit frequency per chunk of 128 (0.78% of the
  # coefficients, as DeMo's 32 of a 64 x 64 tile): 4 + 7/8 bytes.
  assert c.payload_bytes((n,), F32) / n == (4 + 7 / 8) / 128
  c = C.dct_top_k(32, chunk_size=64)
  # 32 float32 values and 32 six-bit frequencies per chunk of 64: 152 bytes.
  assert c.payload_bytes((n,), F32) / n == 152 / 64 == 2.375


@pytest.mark.parametrize("k, chunk", [(32, 64), (3, 100), (1, 16)])
def test_coefficients_selection_and_decoding_match_a_float64_dct(k, chunk):
  c = C.dct_top_k(k, chunk_size=chunk)
  x = jax.random.normal(KEY, SHAPE) * 1e-3
  x_hat, payload, _ = jax.jit(c.roundtrip)(x, (), KEY)
  assert x_hat.shape == SHAPE and x_hat.dtype == F32
  coefs = np_dct(np_chunks(x, chunk))  # float64, (chunks, chunk)
  rows = coefs.shape[0]
  idx = np_unpack(payload["indices"], math.ceil(math.log2(chunk)), rows * k)
  idx = idx.reshape(rows, k)
  vals = np.asarray(payload["values"], np.float64).reshape(rows, k)
  scale = np.abs(coefs).max(axis=1, keepdims=True)
  tol = 1e-5 * scale
  for r in range(rows):
    assert len(set(idx[r])) == k and idx[r].max() < chunk
    others = np.delete(np.abs(coefs[r]), idx[r])
    if others.size:  # the k largest: none left out is larger than one sent
      assert np.abs(coefs[r, idx[r]]).min() >= others.max() - tol[r, 0]
  assert np.all(np.abs(vals - np.take_along_axis(coefs, idx, axis=1)) <= tol)
  assert np.all(np.diff(np.abs(vals), axis=1) <= tol)  # largest first
  # Decoding is the inverse DCT of the sent coefficients, padding dropped.
  sparse = np.zeros_like(coefs)
  np.put_along_axis(sparse, idx, vals, axis=1)
  want = np_idct(sparse).ravel()[: math.prod(SHAPE)].reshape(SHAPE)
  np.testing.assert_allclose(np.asarray(x_hat), want, rtol=0, atol=1e-6 * scale.max())
  np.testing.assert_allclose(
    np.asarray(x_hat), np_dct_top_k(x, k, chunk), rtol=0, atol=1e-6 * scale.max()
  )


@pytest.mark.parametrize("chunk, n", [(2, 7), (7, 50), (64, 1073), (256, 1000)])
def test_all_coefficients_round_trip_to_float32_rounding(chunk, n):
  c = C.dct_top_k(chunk, chunk_size=chunk)
  x = jax.random.normal(KEY, (n,))
  x_hat, _, _ = jax.jit(c.roundtrip)(x, (), KEY)
  err = np.abs(np.asarray(x_hat, np.float64) - np.asarray(x, np.float64))
  # Two products of chunk terms each, rounded in float32: a few ulps of the chunk.
  assert err.max() <= 4 * math.sqrt(chunk) * 2.0**-24 * float(jnp.abs(x).max())
  assert err.max() > 0  # float32 arithmetic, not an identity short-cut


def test_a_bfloat16_leaf_with_float32_coefficients_round_trips_exactly():
  c = C.dct_top_k(64, chunk_size=64, value_dtype=jnp.float32)
  x = (jax.random.normal(KEY, (1000,)) * 1e-2).astype(BF16)
  x_hat, payload, _ = jax.jit(c.roundtrip)(x, (), KEY)
  assert x_hat.dtype == BF16 and payload["values"].dtype == F32
  np.testing.assert_array_equal(np.asarray(x_hat, F32), np.asarray(x, F32))


def test_a_smooth_chunk_is_held_by_few_coefficients():
  # What DeMo relies on: a slowly varying signal needs few frequencies, so
  # top-k of the coefficients loses far less than top-k of the entries.
  x = jnp.sin(jnp.linspace(0.0, 3.0, 4096)) + 0.1
  dct = C.dct_top_k(4, chunk_size=64)
  entries = C.chunked_top_k(4, chunk_size=64)
  dct_err = float(jnp.linalg.norm(dct.roundtrip(x, (), None)[0] - x))
  entries_err = float(jnp.linalg.norm(entries.roundtrip(x, (), None)[0] - x))
  assert dct.payload_bytes(x.shape, x.dtype) == entries.payload_bytes(x.shape, x.dtype)
  assert dct_err < 1e-3 * float(jnp.linalg.norm(x)) < 1e-2 * entries_err


def test_eager_jit_and_vmap_agree():
  c = C.dct_top_k(8, chunk_size=32)
  xs = jax.random.normal(KEY, (3, 200)) * 1e-3
  one = lambda x: c.roundtrip(x, (), None)[0]
  batched = np.asarray(jax.jit(jax.vmap(one))(xs))
  jitted = jax.jit(one)
  for i in range(3):
    np.testing.assert_allclose(
      batched[i], np.asarray(jitted(xs[i])), rtol=0, atol=1e-6 * 1e-3
    )
    np.testing.assert_allclose(
      batched[i], np.asarray(one(xs[i])), rtol=0, atol=1e-6 * 1e-3
    )


def test_zeros_decode_to_zeros_and_a_non_finite_step_is_skipped():
  c = C.dct_top_k(4, chunk_size=16)
  out = jax.jit(c.roundtrip)(jnp.zeros((100,)), (), None)[0]
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  x = jnp.linspace(-1.0, 1.0, 100).at[3].set(jnp.nan)
  out = np.asarray(jax.jit(c.roundtrip)(x, (), None)[0])
  assert not np.isfinite(out[:16]).any()  # the NaN's chunk, all of it
  tx = C.compress(c, feedback=C.error_feedback(decay=0.9))
  u, state = jax.jit(tx.update)({"w": x}, tx.init({"w": x}))
  np.testing.assert_array_equal(np.asarray(u["w"]), 0.0)
  np.testing.assert_array_equal(np.asarray(state.feedback["w"]), 0.0)


def test_compose_quantizes_the_coefficients():
  c = C.compose(C.dct_top_k(4, chunk_size=16), values=C.quantize(8, chunk_size=4))
  x = jax.random.normal(KEY, (100,))
  x_hat, payload, _ = jax.jit(c.roundtrip)(x, c.init((100,), F32), KEY)
  m = 7 * 4  # 7 chunks of 16, 4 coefficients each, in int8 with a scale per 4
  held = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(payload))
  assert held == c.payload_bytes((100,), F32) == m + 4 * (m // 4) + _ceil(m * 4, 8)
  np.testing.assert_allclose(np.asarray(x_hat), np_dct_top_k(x, 4, 16), atol=0.05)


# -- error feedback with a decay ------------------------------------------------------


@pytest.mark.parametrize("decay", [0.5, 0.75])
def test_decayed_error_feedback_follows_its_recursion(decay):
  # top_k sends entries unchanged, so each step is float32 arithmetic alone:
  # bit for bit where decay * e is exact (0.5); XLA may fuse decay * e + g
  # into one rounding (an FMA), so within an ulp otherwise.
  exact = decay == 0.5
  tx = C.compress(C.top_k(0.25), feedback=C.error_feedback(decay=decay))
  rng = np.random.default_rng(1)
  grads = rng.normal(size=(5, 40)).astype(F32)
  state = tx.init({"w": jnp.zeros(40)})
  update = jax.jit(tx.update)
  e = np.zeros(40, F32)
  for g in grads:
    u, state = update({"w": jnp.asarray(g)}, state)
    a = (F32(decay) * e + g).astype(F32)  # e <- decay e + g
    keep = np.argsort(-np.abs(a), kind="stable")[:10]
    sent = np.zeros_like(a)
    sent[keep] = a[keep]
    e = a - sent  # e <- e - C(e)
    got_u, got_e = np.asarray(u["w"]), np.asarray(state.feedback["w"])
    if exact:
      np.testing.assert_array_equal(got_u, sent)
      np.testing.assert_array_equal(got_e, e)
    else:
      np.testing.assert_allclose(got_u, sent, rtol=2.0**-23, atol=0)
      np.testing.assert_allclose(got_e, e, rtol=2.0**-23 * 8, atol=1e-7)


def test_decayed_error_feedback_with_dct_top_k_matches_numpy():
  decay, k, chunk = 0.9, 3, 16
  tx = C.compress(C.dct_top_k(k, chunk_size=chunk), feedback=C.error_feedback(decay))
  rng = np.random.default_rng(2)
  grads = rng.normal(size=(4, 10, 9)).astype(F32)  # 90: a short last chunk
  state = tx.init({"w": jnp.zeros((10, 9))})
  update = jax.jit(tx.update)
  m = np.zeros((10, 9))
  for g in grads:
    u, state = update({"w": jnp.asarray(g)}, state)
    m = decay * m + g
    sent = np_dct_top_k(m, k, chunk)
    m = m - sent
    np.testing.assert_allclose(np.asarray(u["w"]), sent, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.feedback["w"]), m, rtol=0, atol=1e-5)


def test_decay_one_is_plain_error_feedback():
  g = {"w": jax.random.normal(KEY, (50,))}
  a = C.compress(C.top_k(0.1), feedback=C.error_feedback(decay=1.0))
  b = C.compress(C.top_k(0.1))
  sa, sb = a.init(g), b.init(g)
  update_a, update_b = jax.jit(a.update), jax.jit(b.update)
  for _ in range(3):
    ua, sa = update_a(g, sa)
    ub, sb = update_b(g, sb)
    np.testing.assert_array_equal(np.asarray(ua["w"]), np.asarray(ub["w"]))
  np.testing.assert_array_equal(
    np.asarray(sa.feedback["w"]), np.asarray(sb.feedback["w"])
  )


def test_a_feedback_instance_is_accepted_and_bad_feedbacks_name_the_call():
  fb = C.error_feedback(decay=0.25)
  g = {"w": jnp.array([1.0, -4.0, 2.0, 3.0])}
  tx = C.compress(C.top_k(0.5), feedback=fb)
  _, state = tx.update(g, tx.init(g))
  _, state = tx.update(g, state)
  np.testing.assert_array_equal(np.asarray(state.feedback["w"]), [1.25, 0.0, 2.5, 0.0])
  for call, make in [
    ("compress", lambda f: C.compress(C.top_k(0.5), feedback=f)),
    (
      "compressed_mean",
      lambda f: distributed.compressed_mean(C.sign(), "d", feedback=f),
    ),
  ]:
    with pytest.raises(TypeError, match=rf"{call}\(feedback=0.9\) must be a Feedback"):
      make(0.9)
    with pytest.raises(TypeError, match=rf"{call}\(feedback=<function error_feedback"):
      make(C.error_feedback)  # the factory, not called
    with pytest.raises(ValueError, match=rf"{call}\(feedback='momentum'\) must be one"):
      make("momentum")
    make("ef21"), make(None), make(C.ef21())


# -- bad arguments --------------------------------------------------------------------


BAD = [
  (lambda: C.dct_top_k(0), r"dct_top_k\(k=0\) must be an int >= 1"),
  (lambda: C.dct_top_k(129), r"dct_top_k\(k=129\) must be at most chunk_size=128"),
  (lambda: C.dct_top_k(1, chunk_size=1), r"dct_top_k\(chunk_size=1\) must be an int"),
  (lambda: C.dct_top_k(2.0), r"dct_top_k\(k=2.0\) must be an int"),
  (lambda: C.dct_top_k(8, chunk_size=8192), r"dct_top_k\(chunk_size=8192\) must be at"),
  (lambda: C.dct_top_k(value_dtype=jnp.int8), r"dct_top_k\(value_dtype=.*floating"),
  (lambda: C.error_feedback(decay=1.5), r"error_feedback\(decay=1.5\) must be a num"),
  (lambda: C.error_feedback(decay=-0.1), r"error_feedback\(decay=-0.1\) must be"),
  (lambda: C.error_feedback(decay="0.9"), r"error_feedback\(decay='0.9'\) must be"),
  (lambda: C.error_feedback(decay=True), r"error_feedback\(decay=True\) must be"),
  (lambda: distributed.demo(-0.1, axis_name="data"), r"demo\(learning_rate=-0.1\)"),
  (lambda: distributed.demo("0.1", axis_name="data"), r"demo\(learning_rate='0.1'\)"),
  (lambda: distributed.demo(0.1, axis_name="data", beta=2), r"demo\(beta=2\) must be"),
  (lambda: distributed.demo(0.1, axis_name="d", k=129), r"demo\(k=129\) must be at"),
  (lambda: distributed.demo(0.1, axis_name="d", chunk_size=0), r"demo\(chunk_size=0\)"),
  (
    lambda: distributed.demo(0.1, axis_name="d", weight_decay=-1.0),
    r"demo\(weight_decay=-1.0\) must be a finite non-negative number",
  ),
]


@pytest.mark.parametrize("make, message", BAD)
def test_bad_arguments_raise_naming_the_call_argument_and_value(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_dct_top_k_cannot_be_summed_before_decoding():
  with pytest.raises(
    ValueError, match=r"compressed_mean\(exchange='psum'\): 'dct_top_k'"
  ):
    distributed.compressed_mean(C.dct_top_k(), "data", exchange="psum")


# -- DeMo on 8 devices ----------------------------------------------------------------


def loss_fn(params, x, y):  # this device's mean squared error
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def np_grads(params, x, y):
  r = x @ params["w"] + params["b"] - y
  return {"w": 2 * x.T @ r / r.size, "b": 2 * r.sum(axis=0) / r.size}


def _demo_steps(tx, mesh):
  """Jitted ``shard_map`` init and step: params replicated, each device's
  gradient its own (params marked varying), state per device."""

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=P(), out_specs=P("data"))
  def init(params):
    params = jax.lax.pcast(params, "data", to="varying")
    return jax.tree.map(lambda s: s[None], tx.init(params))

  @jax.jit
  @jax.shard_map(
    mesh=mesh,
    in_specs=(P(), P("data"), P("data"), P("data")),
    out_specs=(P(), P("data")),
  )
  def step(params, state, x, y):
    state = jax.tree.map(lambda s: s[0], state)
    grads = jax.grad(loss_fn)(jax.lax.pcast(params, "data", to="varying"), x[0], y[0])
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), jax.tree.map(lambda s: s[None], state)

  return init, step


def test_demo_on_8_devices_matches_a_numpy_simulation_of_8_workers():
  lr, beta, wd, k, chunk = 0.05, 0.9, 0.1, 3, 16
  tx = distributed.demo(
    lr, axis_name="data", beta=beta, k=k, chunk_size=chunk, weight_decay=wd
  )
  mesh = Mesh(np.array(jax.devices()), ("data",))
  assert mesh.size == N_DEVICES
  rng = np.random.default_rng(3)
  x = rng.normal(size=(N_DEVICES, 6, 12)).astype(F32)  # each device's own batch
  y = rng.normal(size=(N_DEVICES, 6, 10)).astype(F32)
  params = {"w": (rng.normal(size=(12, 10)) * 0.3).astype(F32), "b": np.zeros(10, F32)}
  init, step = _demo_steps(tx, mesh)
  state = init(params)
  ambiguous = 0
  for _ in range(4):
    # One DeMo step in numpy (float64) from the devices' params and momenta.
    p64 = {n: np.asarray(v, np.float64) for n, v in params.items()}
    m = {n: np.asarray(v, np.float64) for n, v in state[0].feedback.tree().items()}
    want_m, want_p, mean = {}, {}, {}
    for name in ("b", "w"):
      sent = []
      for d in range(N_DEVICES):
        g = np_grads(p64, x[d].astype(np.float64), y[d].astype(np.float64))[name]
        md = beta * m[name][d] + g  # the momentum
        sent.append(np_dct_top_k(md, k, chunk))  # its top DCT coefficients
        want_m.setdefault(name, []).append(md - sent[-1])  # taken out of it
      mean[name] = np.mean(sent, axis=0)  # every device's decoded part, averaged
      want_p[name] = p64[name] - lr * (np.sign(mean[name]) + wd * p64[name])

    params, state = step(params, state, x, y)
    for name in ("b", "w"):
      got_m = np.asarray(state[0].feedback[name])
      np.testing.assert_allclose(got_m, np.stack(want_m[name]), rtol=0, atol=1e-5)
      # Where the mean is within float32 rounding of zero its sign is a coin.
      clear = np.abs(mean[name]) > 1e-5 * np.abs(mean[name]).max()
      ambiguous += int((~clear).sum())
      got = np.asarray(params[name], np.float64)
      np.testing.assert_allclose(got[clear], want_p[name][clear], rtol=0, atol=1e-6)
  assert ambiguous <= 2
  stats = C.compression_stats(state)
  per_device = formula(120, k, chunk, 4) + formula(10, k, chunk, 4)
  assert per_device == 108 + 14
  np.testing.assert_array_equal(
    np.asarray(stats["dct_top_k/bytes_sent"]), (N_DEVICES - 1) * per_device
  )


def test_demo_without_weight_decay_needs_no_params_and_rejects_summed_gradients():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  tx = distributed.demo(0.1, axis_name="data", k=2, chunk_size=8)

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=P("data"), out_specs=P())
  def update(g):
    updates, _ = tx.update(g[0], tx.init(g[0]))  # no params
    return updates

  grads = jnp.stack([jnp.full(8, float(i) - 2.5) for i in range(N_DEVICES)])
  np.testing.assert_array_equal(np.asarray(update(grads)), F32(-0.1))  # mean 1 > 0

  @jax.shard_map(mesh=mesh, in_specs=P(), out_specs=P())
  def replicated(params):
    grads = jax.grad(lambda p: jnp.sum(p**2))(params)  # summed over devices
    return tx.update(grads, tx.init(params))[0]

  with pytest.raises(ValueError, match=r"demo\(axis_name='data'\): the gradient leaf"):
    jax.jit(replicated)(jnp.ones(8))

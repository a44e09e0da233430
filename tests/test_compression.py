"""Compressors, feedback and the compress/dgc transforms, checked against numpy."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clipjax import compression as C
from clipjax.compression._base import count_of, nbytes

KEY = jax.random.PRNGKey(0)
F32, BF16, F64 = jnp.float32, jnp.bfloat16, np.float64
SHAPE = (37, 29)  # 1073 elements: not a multiple of 4, 8 or 128
# Sampled top-k samples ceil(512 / ratio) elements, and a leaf no larger than
# that takes the exact path: at 0.5, SHAPE (1073 > 1024) takes the sampled one.
SAMPLED_RATIO = 0.5


def _n(shape):
  return math.prod(shape)


def _ceil(a, b):
  return -(-a // b)


# Each case: a compressor and its payload bytes computed by hand from the docs.
CASES = {
  "top_k": (
    lambda: C.top_k(0.1),
    lambda n, isz: count_of(0.1, n) * (isz + 4),
  ),
  "top_k_bf16_values": (
    lambda: C.top_k(0.1, value_dtype=BF16),
    lambda n, isz: count_of(0.1, n) * (2 + 4),
  ),
  "top_k_sampled": (
    lambda: C.top_k(SAMPLED_RATIO, selection="sampled"),
    lambda n, isz: count_of(SAMPLED_RATIO, n) * (isz + 4),
  ),
  "random_k": (lambda: C.random_k(0.1), lambda n, isz: count_of(0.1, n) * isz),
  "qsgd": (lambda: C.qsgd(), lambda n, isz: n + 4 * _ceil(n, 128)),
  "qsgd_l2_int16": (
    lambda: C.qsgd(300, bucket_size=100, norm="l2"),
    lambda n, isz: 2 * n + 4 * _ceil(n, 100),
  ),
  "terngrad": (lambda: C.terngrad(), lambda n, isz: _ceil(n, 4) + 4),
  "sign": (lambda: C.sign(), lambda n, isz: _ceil(n, 8) + 4),
  "natural": (lambda: C.natural(), lambda n, isz: n + _ceil(n, 8)),
  "cast": (lambda: C.cast(jnp.float16), lambda n, isz: 2 * n),
  "powersgd": (lambda: C.powersgd(2), lambda n, isz: (37 + 29) * 2 * 4),
}


def _roundtrip(c, x, key=KEY, jit=True):
  state = c.init(x.shape, x.dtype)
  fn = jax.jit(c.roundtrip) if jit else c.roundtrip
  return fn(x, state, key)


# -- numpy decoders: what each documented rule makes of a payload that encodes x --
#
# Each takes ``(payload, x, x_hat)`` as numpy arrays, asserts that the payload
# encodes ``x`` as documented, and returns the decode it implies, in x's dtype.
# Only random-k reads ``x_hat``: its indices come from the key, which numpy
# cannot redraw, so it reads where they fell and checks one per block.


def _top_k_decode(ratio, value_dtype=None, sampled=False):
  def decode(payload, x, x_hat):
    del x_hat
    flat = x.ravel()
    n = flat.size
    k = count_of(ratio, n)
    idx, vals = np.asarray(payload["indices"]), np.asarray(payload["values"])
    assert idx.shape == vals.shape == (k,)
    kept = idx[idx < n]
    mag = np.abs(flat.astype(F64))
    if sampled:  # the first k in index order of those at or above a threshold
      np.testing.assert_array_equal(idx[kept.size :], n)
      thr = mag[kept].min()
      np.testing.assert_array_equal(kept, np.flatnonzero((mag >= thr) & (mag > 0))[:k])
      assert not np.array_equal(kept, np.argsort(-mag, kind="stable")[:k])
    else:  # k distinct entries, none smaller than one left out (ties either way)
      assert np.unique(kept).size == k
      assert mag[kept].min() >= np.delete(mag, kept).max()
    want = flat[kept].astype(value_dtype or x.dtype)
    np.testing.assert_array_equal(vals[: kept.size].astype(F64), want.astype(F64))
    assert not np.any(vals[kept.size :])
    out = np.zeros(n, F64)
    out[kept] = want.astype(F64)
    return out.astype(x.dtype).reshape(x.shape)

  return decode


def _random_k_decode(ratio):
  def decode(payload, x, x_hat):
    flat, hat = x.ravel(), x_hat.ravel().astype(F64)
    k = count_of(ratio, flat.size)
    size, extra = divmod(flat.size, k)
    sizes = size + (np.arange(k) < extra)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    picked = np.add.reduceat(hat != 0, starts)
    np.testing.assert_array_equal(picked, 1)  # one index per block (x has no 0)
    where = np.flatnonzero(hat)
    vals = np.asarray(payload["values"])
    np.testing.assert_array_equal(vals.astype(F64), flat[where].astype(F64))
    out = np.zeros(flat.size, x.dtype)
    scaled = vals.astype(np.float32) * sizes.astype(np.float32)  # unbiased
    out[where] = scaled.astype(x.dtype)
    return out.reshape(x.shape)

  return decode


def _qsgd_decode(levels, bucket_size, norm):
  def decode(payload, x, x_hat):
    del x_hat
    flat = x.ravel().astype(F64)
    n = flat.size
    lv = payload["levels"]
    lv = np.concatenate([lv, payload.get("tail", lv[:0])])
    assert payload["levels"].dtype == (np.int8 if levels <= 127 else np.int16)
    scales = np.asarray(payload["scales"])
    assert lv.size == n and scales.size == _ceil(n, bucket_size)
    bucket = np.arange(n) // bucket_size
    if norm == "max":
      r = np.maximum.reduceat(np.abs(flat), np.arange(0, n, bucket_size))
    else:
      r = np.sqrt(np.add.reduceat(flat**2, np.arange(0, n, bucket_size)))
    # A level's value: r / levels rounded up to 24 - bit_length(levels) bits.
    bits = levels.bit_length()
    assert np.all((scales.view(np.uint32) & ((1 << bits) - 1)) == 0)
    assert np.all(scales >= r / levels * (1 - 1e-6))
    assert np.all(scales <= r / levels * (1 + 2.0 ** (bits - 23) + 1e-6))
    # Each level: |x| / scale rounded down or up, with x's sign.
    y = np.abs(flat) / scales[bucket]
    mag = np.abs(lv.astype(F64))
    assert np.all((np.floor(y * (1 - 1e-6)) <= mag) & (mag <= np.ceil(y * (1 + 1e-6))))
    assert np.all(mag <= levels) and np.all((np.sign(lv) == np.sign(flat)) | (lv == 0))
    out = (lv * scales[bucket].astype(F64)).astype(np.float32)  # exact products
    return out.astype(x.dtype).reshape(x.shape)

  return decode


def _terngrad_decode(payload, x, x_hat):
  del x_hat
  flat = x.ravel().astype(F64)
  packed = np.asarray(payload["codes"])
  codes = ((packed[None, :] >> np.array([0, 2, 4, 6])[:, None]) & 3).ravel()
  codes = codes[: flat.size]
  s = float(payload["scale"])
  assert s == np.abs(flat).max()
  assert np.all(flat[codes == 0] < 0) and np.all(flat[codes == 2] > 0)
  out = np.select([codes == 0, codes == 2], [-s, s], 0.0).astype(np.float32)
  return out.astype(x.dtype).reshape(x.shape)


def _sign_decode(payload, x, x_hat):
  del x_hat
  flat = x.ravel().astype(F64)
  neg = np.unpackbits(np.asarray(payload["signs"]), bitorder="little")[: flat.size]
  np.testing.assert_array_equal(neg, flat < 0)
  s = np.asarray(payload["scale"])
  np.testing.assert_allclose(s, np.abs(flat).mean(), rtol=1e-6)
  return np.where(neg == 1, -s.astype(x.dtype), s.astype(x.dtype)).reshape(x.shape)


def _natural_decode(payload, x, x_hat):
  del x_hat
  bits32 = x.ravel().astype(np.float32).view(np.uint32)
  exps = np.asarray(payload["exponents"]).astype(np.uint32)
  e = (bits32 >> 23) & 0xFF
  assert np.all((exps == e) | (exps == e + 1))  # 2**e or 2**(e+1)
  neg = np.unpackbits(np.asarray(payload["signs"]), bitorder="little")[: e.size]
  np.testing.assert_array_equal(neg, bits32 >> 31)
  out = ((exps << 23) | (neg.astype(np.uint32) << 31)).view(np.float32)
  return out.astype(x.dtype).reshape(x.shape)


def _cast_decode(dtype):
  def decode(payload, x, x_hat):
    del x_hat
    want = x.ravel().astype(dtype)
    np.testing.assert_array_equal(np.asarray(payload["values"]), want)
    return want.astype(x.dtype).reshape(x.shape)

  return decode


def _powersgd_decode(payload, x, x_hat):
  del x_hat
  p, q = np.asarray(payload["p"][-1], F64), np.asarray(payload["q"][-1], F64)
  # One power iteration from the initial Q: P orthonormal, Q = X^T P.
  np.testing.assert_allclose(p.T @ p, np.eye(p.shape[1]), atol=1e-5)
  x64 = x.astype(F64)
  np.testing.assert_allclose(q, x64.T @ p, atol=1e-4 * np.abs(x64).max())
  return (p @ q.T).astype(np.float32).astype(x.dtype)


NUMPY_DECODE = {
  "top_k": _top_k_decode(0.1),
  "top_k_bf16_values": _top_k_decode(0.1, value_dtype=BF16),
  "top_k_sampled": _top_k_decode(SAMPLED_RATIO, sampled=True),
  "random_k": _random_k_decode(0.1),
  "qsgd": _qsgd_decode(127, 128, "max"),
  "qsgd_l2_int16": _qsgd_decode(300, 100, "l2"),
  "terngrad": _terngrad_decode,
  "sign": _sign_decode,
  "natural": _natural_decode,
  "cast": _cast_decode(np.float16),
  "powersgd": _powersgd_decode,
}


# -- round trips and exact bytes -------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_keeps_shape_dtype_and_the_claimed_bytes(name, dtype):
  make, formula = CASES[name]
  c = make()
  x = jax.random.normal(KEY, SHAPE).astype(dtype)
  x_hat, payload, _ = _roundtrip(c, x)
  assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
  held = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(payload))
  expected = formula(_n(SHAPE), jnp.dtype(dtype).itemsize)
  assert held == c.payload_bytes(SHAPE, dtype) == expected
  # The payload encodes x as documented, and x_hat is its numpy decode.
  payload = jax.tree.map(np.asarray, payload)
  want = NUMPY_DECODE[name](payload, np.asarray(x), np.asarray(x_hat))
  assert want.dtype == x.dtype
  got, want = np.asarray(x_hat).astype(F64), want.astype(F64)
  if name == "powersgd":  # float32 products, summed in XLA's order
    tol = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
  else:
    np.testing.assert_array_equal(got, want)


def _assert_sampled(payload, n):
  """Sampled top-k's mark: indices in increasing order, empty slots at ``n``.

  Exact top-k orders its indices by magnitude and fills every slot.
  """
  idx = np.asarray(payload["indices"])
  kept = idx[idx < n]
  assert 0 < kept.size < idx.size and np.all(np.diff(kept) > 0)
  np.testing.assert_array_equal(idx[kept.size :], n)


def test_eager_and_jit_round_trips_agree():
  x = jax.random.normal(KEY, SHAPE)
  for name in ("top_k_sampled", "qsgd"):
    c = CASES[name][0]()
    eager, payload, _ = _roundtrip(c, x, jit=False)
    jitted = _roundtrip(c, x, jit=True)[0]
    if name == "top_k_sampled":
      _assert_sampled(payload, x.size)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  "c",
  [C.top_k(1.0), C.random_k(1.0), C.cast(F32)],
  ids=["top_k(1)", "random_k(1)", "cast(f32)"],
)
def test_lossless_settings_are_exact(c):
  x = jax.random.normal(KEY, (50,))
  x_hat, _, _ = _roundtrip(c, x)
  np.testing.assert_array_equal(np.asarray(x_hat), np.asarray(x))


def test_powersgd_sends_small_leaves_dense_and_exact():
  c = C.powersgd(1)
  for shape in [(), (64,), (3, 3), (2, 40)]:
    x = jax.random.normal(KEY, shape)
    x_hat, payload, state = _roundtrip(c, x)
    assert set(payload) == {"values"} and state == ()
    assert c.payload_bytes(shape, F32) == 4 * _n(shape)
    np.testing.assert_array_equal(np.asarray(x_hat), np.asarray(x))


# -- top-k --------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5])
def test_exact_top_k_keeps_exactly_the_k_largest_magnitudes(ratio):
  x = jax.random.normal(KEY, (40, 25))
  k = count_of(ratio, 1000)
  x_hat, payload, _ = _roundtrip(C.top_k(ratio), x)
  xn = np.asarray(x).ravel()
  largest = set(np.argsort(-np.abs(xn))[:k].tolist())
  assert set(np.asarray(payload["indices"]).tolist()) == largest
  expected = np.where(np.isin(np.arange(1000), list(largest)), xn, 0.0)
  np.testing.assert_array_equal(np.asarray(x_hat).ravel(), expected)


@pytest.mark.parametrize("dist", ["normal", "laplace", "uniform"])
def test_sampled_top_k_keeps_between_half_and_one_and_a_half_k(dist):
  n, ratio = 200_000, 0.01
  k = count_of(ratio, n)
  c = C.top_k(ratio, selection="sampled")
  make = {"normal": jax.random.normal, "laplace": jax.random.laplace}.get(
    dist, jax.random.uniform
  )
  x = make(jax.random.PRNGKey(3), (n,)) * 1e-3
  fn = jax.jit(c.roundtrip)
  counts = []
  for seed in range(8):
    x_hat, payload, _ = fn(x, (), jax.random.PRNGKey(seed))
    idx = np.asarray(payload["indices"])
    kept = idx[idx < n]
    counts.append(kept.size)
    assert payload["indices"].shape == (k,)
    assert np.all(np.diff(kept) > 0)  # in index order, none twice: sampled
    xn, xh = np.asarray(x), np.asarray(x_hat)
    np.testing.assert_array_equal(xh[kept], xn[kept])
    assert np.count_nonzero(xh) == kept.size
    if kept.size < k:  # not truncated: everything left out is smaller
      dropped = np.ones(n, bool)
      dropped[kept] = False
      assert np.abs(xn[dropped]).max() <= np.abs(xn[kept]).min()
  assert 0.5 * k <= min(counts) and max(counts) <= k <= 1.5 * k


def test_sampled_top_k_with_ties_never_exceeds_the_payload():
  n = 100_000
  x = jnp.where(jnp.arange(n) % 2 == 0, 1.0, 0.5)  # half the entries tie at the top
  x_hat, payload, _ = _roundtrip(C.top_k(0.01, selection="sampled"), x)
  k = count_of(0.01, n)
  assert payload["indices"].shape == (k,)
  assert int(jnp.count_nonzero(x_hat)) == k
  # The first k of the tied top entries, in index order, as documented.
  np.testing.assert_array_equal(np.asarray(payload["indices"]), 2 * np.arange(k))


def test_sampled_top_k_on_a_small_leaf_is_exact():
  x = jax.random.normal(KEY, (1000,))
  exact = _roundtrip(C.top_k(0.05), x)[0]
  sampled = _roundtrip(C.top_k(0.05, selection="sampled"), x)[0]
  np.testing.assert_array_equal(np.asarray(exact), np.asarray(sampled))


def test_first_true_matches_nonzero():
  from clipjax.compression._compressors import first_true

  mask = jax.random.bernoulli(KEY, 0.03, (10_001,))
  for k in (1, 400):
    want = np.flatnonzero(np.asarray(mask))[:k]
    want = np.concatenate([want, np.full(k - want.size, 10_001)])
    got = jax.jit(first_true, static_argnums=1)(mask, k)
    np.testing.assert_array_equal(np.asarray(got), want)


# -- unbiasedness -------------------------------------------------------------------


def _max_z(c, x, draws=3000):
  """Largest |z| of the mean of ``draws`` decodes against ``x``, elementwise.

  An element that never varies scores 0 if it equals ``x`` and inf otherwise.
  """
  keys = jax.random.split(jax.random.PRNGKey(7), draws)
  state = c.init(x.shape, x.dtype)
  samples = jax.jit(jax.vmap(lambda k: c.roundtrip(x, state, k)[0]))(keys)
  s = np.asarray(samples, np.float64)
  mean, sem = s.mean(0), s.std(0, ddof=1) / np.sqrt(draws)
  gap = np.abs(mean - np.asarray(x, np.float64))
  same = np.isclose(mean, np.asarray(x, np.float64), rtol=1e-6, atol=0)
  z = np.where(sem > 0, gap / np.where(sem > 0, sem, 1.0), np.where(same, 0, np.inf))
  return float(z.max())


X_UNBIASED = jnp.concatenate(
  [jax.random.normal(KEY, (40,)), jnp.array([0.0, 0.05, -5.0, 0.3, 0.3])]
)


@pytest.mark.parametrize(
  "c",
  [
    C.random_k(0.2),
    C.qsgd(4, bucket_size=8),
    C.qsgd(2, bucket_size=16, norm="l2"),
    C.qsgd(300, bucket_size=16, norm="l2"),
    C.terngrad(),
    C.natural(),
  ],
  ids=["random_k", "qsgd_max", "qsgd_l2", "qsgd_300", "terngrad", "natural"],
)
def test_unbiased_compressors_are_unbiased_over_keys(c):
  assert c.unbiased
  # 45 elements: a |z| above 5 has probability below 3e-5 for an unbiased one.
  assert _max_z(c, X_UNBIASED) < 5.0


def test_the_unbiasedness_check_can_fail():
  # The same statistic flags biased compressors: it has power.
  assert _max_z(C.random_k(0.2, unbiased=False), X_UNBIASED) > 8.0
  assert _max_z(C.sign(), X_UNBIASED) > 8.0


def test_random_k_indices_come_from_the_key_alone():
  c = C.random_k(0.1, unbiased=False)
  x1, x2 = jax.random.normal(KEY, (2, 500))
  h1 = _roundtrip(c, x1, jax.random.PRNGKey(5))[0]
  h2 = _roundtrip(c, x2, jax.random.PRNGKey(5))[0]
  h3 = _roundtrip(c, x2, jax.random.PRNGKey(6))[0]
  np.testing.assert_array_equal(np.asarray(h1) != 0, np.asarray(h2) != 0)
  assert np.any((np.asarray(h2) != 0) != (np.asarray(h3) != 0))
  assert int(jnp.count_nonzero(h1)) == 50  # one per block of 10, none twice


# -- bit packing --------------------------------------------------------------------


def test_sign_bits_are_packed_eight_per_byte():
  x = jax.random.normal(KEY, (1001,))
  x_hat, payload, _ = _roundtrip(C.sign(), x)
  xn = np.asarray(x)
  np.testing.assert_array_equal(
    np.asarray(payload["signs"]), np.packbits(xn < 0, bitorder="little")
  )
  assert payload["signs"].dtype == jnp.uint8 and payload["signs"].shape == (126,)
  scale = np.float32(np.abs(xn).mean())
  np.testing.assert_allclose(np.asarray(x_hat), np.where(xn < 0, -scale, scale), 1e-6)


def test_terngrad_codes_are_packed_four_per_byte():
  x = jax.random.normal(KEY, (1001,))
  x_hat, payload, _ = _roundtrip(C.terngrad(), x)
  packed = np.asarray(payload["codes"])
  assert packed.dtype == np.uint8 and packed.shape == (251,)
  # Planar: byte i holds elements i, i + 251, i + 502, i + 753.
  codes = ((packed[None, :] >> np.array([0, 2, 4, 6])[:, None]) & 3).ravel()
  assert np.all(codes[1001:] == 1)  # padding decodes as zero
  scale = float(payload["scale"])
  assert scale == float(np.abs(np.asarray(x)).max())
  expected = np.select([codes[:1001] == 0, codes[:1001] == 2], [-scale, scale], 0.0)
  np.testing.assert_array_equal(np.asarray(x_hat), expected.astype(np.float32))
  # Only the sign of x can come out, or zero; the largest entry always does.
  xn, xh = np.asarray(x), np.asarray(x_hat)
  assert np.all((np.sign(xh) == np.sign(xn)) | (xh == 0))
  assert xh[np.argmax(np.abs(xn))] == xn[np.argmax(np.abs(xn))]


def test_natural_sends_an_exponent_byte_and_a_sign_bit():
  x = jnp.array([1.0, -0.75, 3.0, 0.0, -1e-40, 2.0**-126, 6.0, -1.5] * 3)
  x_hat, payload, _ = _roundtrip(C.natural(), x)
  xn, xh = np.asarray(x), np.asarray(x_hat)
  m, _ = np.frexp(np.abs(xh[xh != 0]))
  assert np.all(m == 0.5)  # powers of two
  mag = np.abs(xn.astype(np.float64))
  lower = 2.0 ** np.floor(np.log2(np.where(mag > 0, mag, 1.0)))
  ok = (np.abs(xh) == lower) | (np.abs(xh) == 2 * lower) | (xh == 0)
  assert np.all(ok[np.abs(xn) >= 2.0**-126])
  assert np.all(np.signbit(xh[xh != 0]) == np.signbit(xn[xh != 0]))
  np.testing.assert_array_equal(
    np.asarray(payload["signs"]), np.packbits(np.signbit(xn), bitorder="little")
  )
  assert payload["exponents"].dtype == jnp.uint8


# -- PowerSGD -----------------------------------------------------------------------


def _low_rank(key, n, m, r):
  a, b = jax.random.normal(key, (2, max(n, m), r))
  return a[:n] @ b[:m].T


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_powersgd_reconstructs_a_rank_r_matrix_at_rank_r(rank):
  c = C.powersgd(rank)
  x = _low_rank(jax.random.PRNGKey(rank), 48, 40, rank)
  state = c.init(x.shape, x.dtype)
  for step in range(2):  # the second step starts from the warm Q
    x_hat, payload, new_state = jax.jit(c.roundtrip)(x, state, jax.random.PRNGKey(step))
    chex.assert_trees_all_close(x_hat, x, atol=2e-4 * float(jnp.abs(x).max()))
    assert payload["p"].shape == (1, 48, rank) and payload["q"].shape == (1, 40, rank)
    np.testing.assert_array_equal(np.asarray(new_state), np.asarray(payload["q"][0]))
    state = new_state
  # One rank too few is not exact.
  harder = _low_rank(KEY, 48, 40, rank + 1)
  assert not bool(jnp.allclose(jax.jit(c.roundtrip)(harder, state, KEY)[0], harder))


def test_powersgd_power_iterations_send_every_round():
  c = C.powersgd(2, power_iterations=3, warm_start=False)
  x = jax.random.normal(KEY, (64, 32))
  x_hat, payload, state = _roundtrip(c, x)
  assert state == ()
  assert payload["p"].shape == (3, 64, 2)
  assert nbytes(payload) == c.payload_bytes((64, 32), F32) == 3 * (64 + 32) * 2 * 4
  # More iterations find the top singular directions better than one.
  one = _roundtrip(C.powersgd(2, warm_start=False), x)[0]
  assert float(jnp.linalg.norm(x - x_hat)) < float(jnp.linalg.norm(x - one))


def test_powersgd_zero_gradient_gives_zeros_then_recovers():
  c = C.powersgd(1)
  x0 = jnp.zeros((32, 16))
  hat0, _, state = _roundtrip(c, x0)
  assert not bool(jnp.any(jnp.isnan(hat0))) and not bool(jnp.any(hat0))
  assert not bool(jnp.any(state))  # Q collapsed to zero ...
  x1 = _low_rank(KEY, 32, 16, 1)
  hat1, _, _ = jax.jit(c.roundtrip)(x1, state, jax.random.PRNGKey(1))
  chex.assert_trees_all_close(hat1, x1, atol=1e-4)  # ... and is redrawn


def test_powersgd_reduce_averages_over_workers_like_the_mean_matrix():
  # Two workers whose mean is rank 2: the exchanged estimate is that mean, and
  # each worker's local part is P Q_i^T, which averages to it.
  c = C.powersgd(2)
  mean = _low_rank(KEY, 40, 30, 2)
  noise = jax.random.normal(jax.random.PRNGKey(9), (40, 30))
  workers = jnp.stack([mean + noise, mean - noise])
  state = c.init((40, 30), F32)

  def worker(x):
    return c.reduce(x, state, KEY, lambda t: jax.lax.pmean(t, "w"))

  mean_hat, local_hat, new_state = jax.vmap(worker, axis_name="w")(workers)
  chex.assert_trees_all_close(mean_hat[0], mean, atol=2e-4)
  chex.assert_trees_all_close(mean_hat[0], mean_hat[1])
  chex.assert_trees_all_close(local_hat.mean(0), mean_hat[0], atol=1e-5)
  chex.assert_trees_all_close(new_state[0], new_state[1])
  # On one process reduce is the round trip.
  alone = c.reduce(workers[0], state, KEY, lambda t: t)
  chex.assert_trees_all_close(alone[0], c.roundtrip(workers[0], state, KEY)[0])


@pytest.mark.parametrize("c", [C.random_k(0.2), C.cast(F32)], ids=["random_k", "cast"])
def test_summable_payloads_decode_to_the_mean_of_decodes(c):
  assert c.summable
  xs = jax.random.normal(KEY, (4, 100))

  def worker(x):
    payload, _ = c.encode(x, (), KEY)  # the same key on every worker
    summed = jax.tree.map(lambda t: jax.lax.pmean(t, "w"), payload)
    return c.decode(summed, x.shape, x.dtype, (), KEY), c.roundtrip(x, (), KEY)[0]

  from_sum, each = jax.vmap(worker, axis_name="w")(xs)
  chex.assert_trees_all_close(from_sum[0], each.mean(0), atol=1e-5)


# -- feedback: mass conservation ----------------------------------------------------

# Decoded values that are 0 or within a factor 2 of the input: a - a_hat is exact.
STERBENZ = ["top_k", "top_k_bf16_values", "top_k_sampled", "natural", "cast"]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", [*sorted(CASES), "random_k_plain"])
def test_error_feedback_conserves_mass(name, dtype):
  c = C.random_k(0.1, unbiased=False) if name == "random_k_plain" else CASES[name][0]()
  tx = C.compress(c, feedback="error_feedback", key=3)
  params = {"w": jnp.zeros(SHAPE, dtype), "b": jnp.zeros((7,), dtype)}
  state = tx.init(params)

  @jax.jit
  def update(g, state):
    # Beside the update, the compressor alone on g + e in g's dtype, with the
    # key compress documents (one program: a second one would fuse differently).
    step_key = jax.random.fold_in(jax.random.PRNGKey(3), state.step)
    alone = {
      leaf: c.roundtrip(
        (g[leaf].astype(F32) + state.feedback[leaf]).astype(dtype),
        state.compressor[leaf],
        jax.random.fold_in(step_key, i),
      )[0]
      for i, leaf in enumerate(("b", "w"))  # jax.tree.leaves order
    }
    return *tx.update(g, state), alone

  for step in range(3):
    g = jax.tree.map(
      lambda p, s=step: jax.random.normal(jax.random.PRNGKey(s), p.shape).astype(dtype),
      params,
    )
    old = state.feedback
    out, state, alone = update(g, state)
    for leaf in ("w", "b"):
      e_old = np.asarray(old[leaf])
      e_new = np.asarray(state.feedback[leaf])
      assert e_new.dtype == np.float32 and out[leaf].dtype == dtype
      a = np.asarray(g[leaf]).astype(np.float32) + e_old  # what was compressed
      sent = np.asarray(out[leaf]).astype(np.float32)
      # What was sent is what the compressor makes of g + e, not any output.
      # compress runs the compressor under jax.vmap over the leaves of a
      # shape; batched products (PowerSGD's factors, random-k's n/k scaling)
      # may round differently there, by an ulp.
      expected = np.asarray(alone[leaf], np.float32)
      if name in ("powersgd", "random_k"):
        np.testing.assert_allclose(sent, expected, rtol=1e-5, atol=1e-6)
      else:
        np.testing.assert_array_equal(sent, expected)
      if name in ("powersgd", "random_k"):
        # The decoder's product may fuse with the subtraction (an FMA): the
        # residual is then a - sent to within an ulp of the larger of the two.
        ulp = np.spacing(np.maximum(np.abs(a), np.abs(sent)).astype(np.float32))
        assert np.all(np.abs(e_new - (a - sent)) <= ulp)
      else:
        np.testing.assert_array_equal(e_new, a - sent)  # the residual's definition
      if name in STERBENZ or name == "random_k_plain":
        np.testing.assert_array_equal(sent + e_new, a)  # bitwise
      else:  # exact up to the rounding of the residual itself
        err = np.abs(sent.astype(np.float64) + e_new - a)
        bound = np.spacing(np.abs(e_new)) / 2 + 1e-45
        if name in ("powersgd", "random_k"):
          # and of the fused product, rounded apart in what was sent
          bound = bound + np.spacing(np.abs(sent)) / 2
        assert np.all(err <= bound)


def test_error_feedback_delivers_everything_eventually():
  # With a constant gradient, top-k with error feedback sends the full sum.
  tx = C.compress(C.top_k(0.1))
  g = {"w": jax.random.normal(KEY, (100,))}
  state = tx.init(g)
  update = jax.jit(tx.update)
  total = jnp.zeros((100,))
  for _ in range(50):
    u, state = update(g, state)
    total = total + u["w"]
  np.testing.assert_allclose(
    np.asarray(total + state.feedback["w"]), 50 * np.asarray(g["w"]), rtol=1e-5
  )


def test_ef21_update_is_the_running_estimate():
  c = C.top_k(0.25)
  tx = C.compress(c, feedback="ef21")
  g = {"w": jax.random.normal(KEY, (40,))}
  state = tx.init(g)
  update, roundtrip = jax.jit(tx.update), jax.jit(c.roundtrip)
  h = np.zeros(40, np.float32)
  for step in range(4):
    gs = {"w": g["w"] * (1.0 + 0.1 * step)}
    out, state = update(gs, state)
    diff = jnp.asarray(np.asarray(gs["w"]) - h)
    h = h + np.asarray(roundtrip(diff, (), KEY)[0])
    np.testing.assert_allclose(np.asarray(out["w"]), h, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.feedback["w"]["estimate"]), h, 1e-6)
  # Lossless compression: the estimate is the gradient after one step.
  tx = C.compress(C.top_k(1.0), feedback="ef21")
  out, _ = tx.update(g, tx.init(g))
  np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(g["w"]))


def test_ef21_distributed_state_keeps_the_shared_estimate():
  fb = C.ef21()
  g = jnp.array([1.0, -2.0])
  state = fb.init(g, True)
  assert set(state) == {"estimate", "shared"}
  out, state, _ = fb.finish(g, state, jnp.array([1.0, 0.0]), jnp.array([0.5, 0.5]))
  np.testing.assert_array_equal(np.asarray(out), [0.5, 0.5])
  np.testing.assert_array_equal(np.asarray(state["estimate"]), [1.0, 0.0])


# -- the compress transformation ----------------------------------------------------


def test_compress_output_is_decode_of_encode_with_the_documented_keys():
  c = C.qsgd(8, bucket_size=16)
  tx = C.compress(c, feedback=None, key=11)
  g = {"a": jax.random.normal(KEY, (30,)), "b": jax.random.normal(KEY, (5, 6))}
  state = tx.init(g)
  roundtrip = jax.jit(c.roundtrip)
  for step in range(2):
    out, state = jax.jit(tx.update)(g, state)
    step_key = jax.random.fold_in(jax.random.PRNGKey(11), step)
    for i, leaf in enumerate(("a", "b")):
      want = roundtrip(g[leaf], (), jax.random.fold_in(step_key, i))[0]
      np.testing.assert_array_equal(np.asarray(out[leaf]), np.asarray(want))
  assert int(state.step) == 2


def test_compress_statistics():
  tx = optax.named_chain(
    ("wire", C.compress(C.top_k(0.1), feedback="error_feedback")),
    ("opt", optax.sgd(1.0)),
  )
  g = {
    "w": jax.random.normal(KEY, (20, 10)),
    "b": jax.random.normal(KEY, (10,)).astype(BF16),
  }
  state = tx.init(g)
  _, state = jax.jit(tx.update)(g, state)
  stats = C.compression_stats(state)
  sent = 20 * (4 + 4) + 1 * (2 + 4)  # k=20 float32 values, k=1 bfloat16 value
  dense = 200 * 4 + 10 * 2
  assert float(stats["wire/top_k/bytes_sent"]) == sent
  assert float(stats["wire/top_k/dense_bytes"]) == dense
  assert float(stats["wire/top_k/ratio"]) == pytest.approx(dense / sent)
  assert float(stats["wire/top_k/density"]) == pytest.approx(21 / 210)
  residual = state["wire"].feedback
  norm = np.sqrt(
    sum(
      np.sum(np.asarray(r, np.float64) ** 2) for r in jax.tree.leaves(residual.tree())
    )
  )
  assert float(stats["wire/top_k/residual_norm"]) == pytest.approx(norm, rel=1e-5)


def test_compression_stats_numbers_repeated_names():
  tx = optax.chain(C.compress(C.sign()), C.compress(C.sign()))
  g = {"w": jnp.ones((16,))}
  _, state = tx.update(g, tx.init(g))
  assert set(C.compression_stats(state)) == {
    f"sign{s}/{f}"
    for s in ("", "_1")
    for f in (
      "bytes_sent",
      "bytes_received",
      "dense_bytes",
      "ratio",
      "density",
      "residual_norm",
    )
  }


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize(
  "c", [C.top_k(0.2), C.sign(), C.powersgd(1)], ids=["top_k", "sign", "powersgd"]
)
def test_compress_chains_with_optax_and_trains(c, opt):
  # Least squares on a 16x12 matrix: chained compression still fits it.
  if opt == "adam":  # optax's adam mixes int32 counts and float32 moments
    with jax.numpy_dtype_promotion("standard"):
      _chain_and_train(c, optax.adam(0.05))
  else:
    _chain_and_train(c, optax.sgd(0.1))


def _chain_and_train(c, opt):
  target = jax.random.normal(KEY, (16, 12))
  loss = lambda p: 0.5 * jnp.sum((p["w"] - target) ** 2)
  comp = C.compress(c)
  tx = optax.chain(comp, opt)
  params = {"w": jnp.zeros((16, 12))}
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    g = jax.grad(loss)(params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  first = float(loss(params))
  for _ in range(150):
    params, state = step(params, state)
  assert float(loss(params)) < 0.2 * first
  # The optimizer sees exactly the decoded update.
  g = jax.grad(loss)(params)
  chained, _ = tx.update(g, state, params)
  decoded, _ = comp.update(g, state[0], params)
  by_hand, _ = opt.update(decoded, state[1], params)
  chex.assert_trees_all_close(chained, by_hand)


def test_compress_under_vmap_matches_a_loop():
  # w takes sampled top-k (3000 > 512 / 0.2 elements), b the exact path.
  tx = C.compress(C.top_k(0.2, selection="sampled"), key=4)
  grads = {
    "w": jax.random.normal(KEY, (3, 60, 50)),
    "b": jax.random.normal(KEY, (3, 8)),
  }
  states = jax.vmap(tx.init)(grads)
  update = jax.jit(jax.vmap(tx.update))
  outs, states = update(grads, states)
  # Fewer than k = 600 sent: the sampled threshold aims at 7/8 of k.
  assert 0 < int(jnp.count_nonzero(outs["w"][0])) < count_of(0.2, 3000)
  outs, states = update(grads, states)
  single = jax.jit(tx.update)
  for i in range(3):
    gi = jax.tree.map(lambda t, i=i: t[i], grads)
    si = tx.init(gi)
    oi, si = single(gi, si)
    oi, si = single(gi, si)
    chex.assert_trees_all_close(oi, jax.tree.map(lambda t, i=i: t[i], outs))
    chex.assert_trees_all_close(
      si.feedback, jax.tree.map(lambda t, i=i: t[i], states.feedback)
    )


def test_compressors_under_vmap_match_a_loop():
  xs = jax.random.normal(KEY, (3, *SHAPE))
  for name in ("qsgd", "natural", "powersgd", "top_k_sampled"):
    c = CASES[name][0]()
    state = c.init(SHAPE, F32)
    one = jax.jit(lambda x, c=c, s=state: c.roundtrip(x, s, KEY)[:2])
    batched, payloads = jax.jit(jax.vmap(one))(xs)
    # PowerSGD's products batch into one dot_general under vmap, whose sums
    # may round differently by an ulp; the others are elementwise and exact.
    tol = {"rtol": 1e-5, "atol": 1e-6} if name == "powersgd" else {"rtol": 0.0}
    for i in range(3):
      chex.assert_trees_all_close(batched[i], one(xs[i])[0], **tol)
      if name == "top_k_sampled":
        _assert_sampled(jax.tree.map(lambda t, i=i: t[i], payloads), xs[i].size)


def test_compress_passes_empty_leaves_and_rejects_integer_ones():
  tx = C.compress(C.sign())
  g = {"e": jnp.zeros((0, 3)), "w": jnp.ones((5,))}
  out, state = tx.update(g, tx.init(g))
  assert out["e"].shape == (0, 3)
  assert float(state.stats.dense_bytes) == 20.0 and float(state.stats.bytes_sent) == 5
  with pytest.raises(TypeError, match=r"compress: leaf \['n'\] has dtype int32"):
    tx.init({"n": jnp.zeros((3,), jnp.int32)})


def test_compress_rejects_a_payload_that_lies_about_its_bytes():
  import dataclasses

  liar = dataclasses.replace(C.sign(), payload_bytes=lambda shape, dtype: 1)
  tx = C.compress(liar)
  g = {"w": jnp.ones((16,))}
  with pytest.raises(ValueError, match="claims 1 payload bytes"):
    tx.update(g, tx.init(g))


# -- DGC ----------------------------------------------------------------------------


def _numpy_dgc(grads, ratio, momentum):
  u = np.zeros_like(grads[0])
  v = np.zeros_like(grads[0])
  outs = []
  for g in grads:
    u = momentum * u + g
    v = v + u
    k = count_of(ratio, g.size)
    idx = np.argsort(-np.abs(v), kind="stable")[:k]
    out = np.zeros_like(g)
    out[idx] = v[idx]
    v[idx] = 0.0
    u[idx] = 0.0
    outs.append(out)
  return outs


def test_dgc_matches_a_numpy_reference():
  grads = np.asarray(jax.random.normal(KEY, (6, 200)), np.float32)
  tx = C.dgc(0.05, momentum=0.9, selection="exact")
  state = tx.init({"w": jnp.zeros(200)})
  update = jax.jit(tx.update)
  for g, want in zip(grads, _numpy_dgc(grads, 0.05, 0.9), strict=True):
    out, state = update({"w": jnp.asarray(g)}, state)
    np.testing.assert_allclose(np.asarray(out["w"]), want, rtol=1e-5, atol=1e-6)


def test_dgc_warms_up_sparsity_in_stages():
  n = 4096
  tx = C.dgc(0.001, warmup_steps=8, selection="exact")
  state = tx.init({"w": jnp.zeros(n)})
  update = jax.jit(tx.update)
  ks = [1024, 1024, 256, 256, 64, 64, 16, 16, 5, 5]  # 75%, 93.75%, ... 99.9%
  for step, k in enumerate(ks):
    g = {"w": jax.random.normal(jax.random.PRNGKey(step), (n,))}
    out, state = update(g, state)
    assert int(jnp.count_nonzero(out["w"])) == k, step
    assert float(state.stats.bytes_sent) == 8 * k
    assert float(state.stats.density) == pytest.approx(k / n)


def test_dgc_clips_locally_before_accumulating():
  tx = C.dgc(0.5, momentum=0.0, clip_norm=1.0, selection="exact")
  g = {"w": jnp.array([3.0, 4.0])}
  out, state = tx.update(g, tx.init(g))
  np.testing.assert_allclose(np.asarray(out["w"]), [0.0, 0.8], rtol=1e-6)
  assert float(state[0].norm) == 5.0  # the clipper's statistics come first
  assert float(C.compression_stats(state)["dgc/bytes_sent"]) == 8


# -- bad arguments ------------------------------------------------------------------


@pytest.mark.parametrize(
  "make, message",
  [
    (lambda: C.top_k(0.0), r"top_k\(ratio=0.0\) must be in \(0, 1\]."),
    (lambda: C.top_k(1.5), r"top_k\(ratio=1.5\) must be in \(0, 1\]."),
    (lambda: C.top_k(-0.1), r"top_k\(ratio=-0.1\)"),
    (lambda: C.top_k(jnp.array(0.1)), r"top_k\(ratio=Array"),
    (lambda: C.top_k(0.1, selection="fast"), r"top_k\(selection='fast'\) must be one"),
    (lambda: C.top_k(0.1, value_dtype=jnp.int8), r"top_k\(value_dtype=<class"),
    (lambda: C.random_k(0), r"random_k\(ratio=0\) must be in"),
    (lambda: C.qsgd(levels=0), r"qsgd\(levels=0\) must be an int >= 1."),
    (lambda: C.qsgd(levels=2.5), r"qsgd\(levels=2.5\)"),
    (lambda: C.qsgd(bucket_size=0), r"qsgd\(bucket_size=0\)"),
    (lambda: C.qsgd(norm="l1"), r"qsgd\(norm='l1'\)"),
    (lambda: C.powersgd(rank=0), r"powersgd\(rank=0\) must be an int >= 1."),
    (lambda: C.powersgd(power_iterations=0), r"powersgd\(power_iterations=0\)"),
    (lambda: C.powersgd(min_compression_rate=0.0), r"min_compression_rate=0.0"),
    (lambda: C.powersgd(orthogonalization_eps=-1.0), r"orthogonalization_eps=-1.0"),
    (lambda: C.cast(jnp.int8), r"cast\(dtype=<class"),
    (lambda: C.compress(C.sign(), feedback="ef"), r"compress\(feedback='ef'\)"),
    (lambda: C.compress(C.sign(), key="seed"), r"compress\(key='seed'\)"),
    (lambda: C.dgc(0.0), r"dgc\(ratio=0.0\)"),
    (lambda: C.dgc(momentum=1.0), r"dgc\(momentum=1.0\) must be in \[0, 1\)."),
    (lambda: C.dgc(clip_norm=0.0), r"dgc\(clip_norm=0.0\)"),
    (lambda: C.dgc(warmup_steps=-1), r"dgc\(warmup_steps=-1\)"),
    (lambda: C.dgc(selection="approx"), r"dgc\(selection='approx'\)"),
  ],
)
def test_bad_arguments_raise_at_construction(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_compress_needs_a_compressor():
  with pytest.raises(TypeError, match=r"compress\(compressor="):
    C.compress(functools.partial(C.top_k, 0.1))

"""Low-bit compressors for pseudo-gradients, and compose, checked against numpy.

quantize (2, 4, 8 bits with a scale per chunk), scaled float8 casts,
chunked_top_k and compose(outer, values=inner): exact bytes against the
payload's arrays and a formula, payloads decoded by numpy from the documented
layouts, error bounds, unbiasedness of stochastic rounding, bit packing, jit
and vmap, zero and non-finite inputs, bad arguments, and compose inside
compress (error feedback) and compressed_mean (8 devices) against numpy
simulations.
"""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clipjax import compression as C
from clipjax import distributed
from clipjax.compression._base import count_of, pack_fields, unpack_fields

KEY = jax.random.PRNGKey(0)
F32, BF16 = np.float32, jnp.bfloat16
SHAPE = (37, 29)  # 1073 elements: not a multiple of 2, 4, 8, 32 or 64
N_DEVICES = 8


def _ceil(a, b):
  return -(-a // b)


# -- numpy references -----------------------------------------------------------------


def np_unpack(packed, bits, n):
  """The documented bit stream: code i in bits [i * bits, (i + 1) * bits)."""
  stream = np.unpackbits(np.asarray(packed), bitorder="little")
  assert stream.size >= n * bits and not stream[n * bits :].any()  # zero padding
  fields = stream[: n * bits].reshape(n, bits).astype(np.int64)
  return (fields << np.arange(bits)).sum(axis=1)


def np_scale(r, levels):
  """``r / levels`` rounded up to ``24 - bit_length(levels)`` significant bits."""
  q = (r.astype(F32) / F32(levels)).astype(F32)
  mask = np.uint32((1 << levels.bit_length()) - 1)
  return ((q.view(np.uint32) + mask) & ~mask).view(F32)


def np_quantize(x, bits, chunk, scales=None):
  """Nearest rounding to ``2**(bits-1) - 1`` levels: (signed levels, scales).

  XLA:CPU divides by a reciprocal, so ``r / levels`` may round a step away
  from numpy's for 7 or 127 levels (1 level divides exactly): given the
  payload's ``scales``, they are checked against the documented bounds and
  used.
  """
  levels = (1 << (bits - 1)) - 1
  flat = np.asarray(x, F32).ravel()
  n = flat.size
  r = np.maximum.reduceat(np.abs(flat), np.arange(0, n, chunk))
  if scales is None:
    scales = np_scale(r, levels)
  else:
    lb = levels.bit_length()
    assert np.all((scales.view(np.uint32) & ((1 << lb) - 1)) == 0)
    assert np.all(scales >= r / levels * (1 - 2.0**-23))
    assert np.all(scales <= r / levels * (1 + 2.0 ** (lb - 23) + 2.0**-23))
  per = scales[np.arange(n) // chunk].astype(np.float64)
  y = np.abs(flat) / np.where(per > 0, per, 1.0)
  lv = np.sign(flat) * np.minimum(np.round(y), levels)
  return lv.astype(np.int64), scales


def np_unpack_planar(packed, bits, size, rows):
  """The documented planar rows: code i of a row of ``size`` in byte i % q,
  bits (i // q) * bits onwards, q = ceil(size * bits / 8); flattened."""
  packed = np.asarray(packed)
  q = _ceil(size * bits, 8)
  assert packed.dtype == np.uint8 and packed.shape == (rows, q)
  i = np.arange(size)
  codes = (packed[:, i % q] >> ((i // q) * bits)) & ((1 << bits) - 1)
  # Slots past the row's end are zero bits.
  j = np.arange(size, q * (8 // bits))
  assert not np.any((packed[:, j % q] >> ((j // q) * bits)) & ((1 << bits) - 1))
  return codes.astype(np.int64).ravel()


def np_level_decode(payload, bits, chunk, n):
  """Decode of quantize's payload: packed codes (or int8 levels) times scales."""
  levels = (1 << (bits - 1)) - 1
  scales = np.asarray(payload["scales"])
  assert scales.dtype == F32 and scales.shape == (_ceil(n, chunk),)
  if bits == 8:
    lv = np.concatenate([payload["levels"], payload.get("tail", [])]).astype(np.int64)
  else:
    # Whole chunks' rows, then a short last chunk's row: "codes", then "tail".
    whole, tail = divmod(n, chunk)
    pieces = [(chunk, whole)] if whole else []
    pieces += [(tail, 1)] if tail else []
    names = ["codes", "tail"][: len(pieces)]
    assert set(payload) == {*names, "scales"}
    rows = [
      np_unpack_planar(payload[name], bits, size, count)
      for name, (size, count) in zip(names, pieces, strict=True)
    ]
    lv = np.concatenate(rows) - levels
  assert lv.shape == (n,) and np.all(np.abs(lv) <= levels)
  return lv, (lv * scales[np.arange(n) // chunk]).astype(F32)


def np_chunk_top_k(x, k, chunk):
  """Positions (flat) and values of the k largest |x| of every chunk."""
  flat = np.asarray(x, F32).ravel()
  n = flat.size
  c = _ceil(n, chunk)
  padded = np.zeros(c * chunk, F32)
  padded[:n] = flat
  order = np.argsort(-np.abs(padded.reshape(c, chunk)), axis=1, kind="stable")[:, :k]
  pos = (order + chunk * np.arange(c)[:, None]).ravel()
  return pos, padded[pos]


def np_scatter(pos, vals, n):
  out = np.zeros(max(n, int(pos.max()) + 1), F32)
  out[pos] = vals
  return out[:n]


# -- cases: compressor, bytes formula, numpy decode of its payload --------------------
#
# Each numpy decode takes (payload as numpy, x as numpy float32 flat) and
# returns x_hat, asserting that the payload encodes x as documented.


def _quantize_case(bits, chunk):
  def decode(payload, flat):
    lv, out = np_level_decode(payload, bits, chunk, flat.size)
    want, _ = np_quantize(flat, bits, chunk, np.asarray(payload["scales"]))
    np.testing.assert_array_equal(lv, want)  # the nearest levels
    return out

  def per_level(n):  # a row of whole bytes per chunk
    if bits == 8:
      return n
    return n // chunk * _ceil(chunk * bits, 8) + _ceil(n % chunk * bits, 8)

  return (
    lambda: C.quantize(bits, chunk_size=chunk),
    lambda n, isz: per_level(n) + 4 * _ceil(n, chunk),
    decode,
  )


def _scaled_cast_case(dtype, chunk):
  np_dtype = np.dtype(getattr(ml_dtypes, jnp.dtype(dtype).name))
  fmax = float(ml_dtypes.finfo(np_dtype).max)

  def decode(payload, flat):
    n = flat.size
    exps = np.asarray(payload["exponents"])
    assert exps.dtype == np.uint8 and exps.shape == (_ceil(n, chunk),)
    e = exps.astype(np.int64) - 127
    r = np.maximum.reduceat(np.abs(flat).astype(np.float64), np.arange(0, n, chunk))
    # The smallest power of two bringing each chunk's max to at most fmax.
    assert np.all(r <= fmax * 2.0**e)
    assert np.all((r > fmax * 2.0 ** (e - 1)) | (e == -126) | (r == 0))
    scale = 2.0 ** e[np.arange(n) // chunk]
    vals = np.asarray(payload["values"])
    assert vals.dtype == np_dtype
    want = (flat.astype(np.float64) / scale).astype(F32).astype(np_dtype)
    np.testing.assert_array_equal(vals.view(np.uint8), want.view(np.uint8))
    return (vals.astype(np.float64) * scale).astype(F32)

  isz = jnp.dtype(dtype).itemsize
  return (
    lambda: C.cast(dtype, chunk_size=chunk),
    lambda n, _: n * isz + _ceil(n, chunk),
    decode,
  )


def _top_k_sent(payload, flat):
  """top_k(0.1)'s positions, checked against numpy, and the values it sends."""
  k = count_of(0.1, flat.size)
  pos = np.asarray(payload["indices"])
  want = np.argsort(-np.abs(flat), kind="stable")[:k]
  np.testing.assert_array_equal(np.sort(pos), np.sort(want))
  return pos, flat[pos]


def _chunk_sent(k, chunk):
  """chunked_top_k(k, chunk)'s positions, unpacked from the documented bit
  stream and checked against numpy, and the values it sends."""
  bits = math.ceil(math.log2(chunk))

  def sent(payload, flat):
    n, c = flat.size, _ceil(flat.size, chunk)
    idx = np_unpack(payload["indices"], bits, c * k)
    assert np.all(idx < chunk)
    pos = idx + chunk * np.repeat(np.arange(c), k)
    want, _ = np_chunk_top_k(flat, k, chunk)
    np.testing.assert_array_equal(np.sort(pos), np.sort(want))  # the k largest
    padded = np.concatenate([flat, np.zeros(c * chunk - n, F32)])
    return pos, padded[pos]

  return sent


def _chunk_top_k_case(k, chunk, value_dtype=None):
  bits = math.ceil(math.log2(chunk))
  sent = _chunk_sent(k, chunk)
  vdt = np.dtype(F32 if value_dtype is None else value_dtype)

  def decode(payload, flat):
    pos, vals = sent(payload, flat)
    np.testing.assert_array_equal(payload["values"], vals.astype(vdt))
    return np_scatter(pos, vals.astype(vdt).astype(F32), flat.size)

  def nbytes(n, isz):
    m = _ceil(n, chunk) * k
    return m * (isz if value_dtype is None else vdt.itemsize) + _ceil(m * bits, 8)

  make = lambda: C.chunked_top_k(k, chunk_size=chunk, value_dtype=value_dtype)
  return make, nbytes, decode


def _compose_case(make_outer, sent, outer_bytes, values_count, bits, chunk):
  """compose(outer, values=quantize(bits, chunk)): the outer's values, found by
  numpy, quantized by numpy, at the outer's positions."""
  make_inner, inner_bytes, inner_decode = _quantize_case(bits, chunk)

  def decode(payload, flat):
    pos, vals = sent(payload, flat)
    vals_hat = inner_decode(payload["values"], vals)
    return np_scatter(pos, vals_hat, flat.size)

  def nbytes(n, isz):
    m = values_count(n)
    return outer_bytes(n, isz) - m * isz + inner_bytes(m, isz)

  return lambda: C.compose(make_outer(), values=make_inner()), nbytes, decode


CASES = {
  "int4": _quantize_case(4, 64),
  "int2": _quantize_case(2, 64),
  "int4_chunk_7": _quantize_case(4, 7),
  "int8": _quantize_case(8, 64),
  "float8_e4m3fn_32": _scaled_cast_case(jnp.float8_e4m3fn, 32),
  "float8_e5m2_1000": _scaled_cast_case(jnp.float8_e5m2, 1000),
  "chunked_top_k_2_64": _chunk_top_k_case(2, 64),
  "chunked_top_k_3_100": _chunk_top_k_case(3, 100),
  "chunked_top_k_bf16": _chunk_top_k_case(4, 16, BF16),
  "top_k+int8": _compose_case(
    lambda: C.top_k(0.1),
    _top_k_sent,
    lambda n, isz: count_of(0.1, n) * (isz + 4),
    lambda n: count_of(0.1, n),
    8,
    64,
  ),
  "chunked_top_k+int2": _compose_case(
    lambda: C.chunked_top_k(2, chunk_size=64),
    _chunk_sent(2, 64),
    _chunk_top_k_case(2, 64)[1],
    lambda n: _ceil(n, 64) * 2,
    2,
    64,
  ),
  "chunked_top_k+int4_chunk_6": _compose_case(
    lambda: C.chunked_top_k(3, chunk_size=32),
    _chunk_sent(3, 32),
    _chunk_top_k_case(3, 32)[1],
    lambda n: _ceil(n, 32) * 3,
    4,
    6,
  ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_exact_bytes_and_the_numpy_decode_of_the_payload(name):
  make, formula, np_decode = CASES[name]
  c = make()
  x = jax.random.normal(KEY, SHAPE) * 1e-3  # pseudo-gradient sized
  x_hat, payload, _ = jax.jit(c.roundtrip)(x, c.init(SHAPE, F32), KEY)
  assert x_hat.shape == SHAPE and x_hat.dtype == F32
  held = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(payload))
  assert held == c.payload_bytes(SHAPE, F32) == formula(math.prod(SHAPE), 4)
  payload = jax.tree.map(np.asarray, payload)
  want = np_decode(payload, np.asarray(x).ravel())
  np.testing.assert_array_equal(np.asarray(x_hat).ravel(), want)


@pytest.mark.parametrize("bits", [2, 4])
def test_nearest_rounding_error_is_at_most_half_a_level(bits):
  levels, chunk = (1 << (bits - 1)) - 1, 64
  x = jax.random.laplace(KEY, (80, chunk)) * 1e-2
  c = C.quantize(bits, chunk_size=chunk)
  x_hat, _, _ = jax.jit(c.roundtrip)(x.reshape(-1), (), None)
  xn, xh = np.asarray(x, np.float64), np.asarray(x_hat, np.float64).reshape(80, chunk)
  r = np.abs(xn).max(axis=1, keepdims=True)
  # r / (2 L), with the scale rounded up by at most 2**(bits - 23) and
  # float32's rounding of |x| / scale.
  assert np.all(np.abs(xh - xn) <= r / (2 * levels) * (1 + 2.0**-19))
  # Each chunk's largest element lands on the top level, nearly exact.
  top = np.argmax(np.abs(xn), axis=1)
  rows = np.arange(80)
  np.testing.assert_allclose(xh[rows, top], xn[rows, top], rtol=2.0**-19)
  assert np.all((np.sign(xh) == np.sign(xn)) | (xh == 0))


def test_scaled_float8_keeps_small_values_that_a_raw_cast_loses():
  x = jnp.array([3e-3, -1e-4, 5e-4, 2e-5, -7e-3, 1e-2] * 6)
  raw = jax.jit(C.cast(jnp.float8_e4m3fn).roundtrip)(x, (), None)[0]
  scaled = jax.jit(C.cast(jnp.float8_e4m3fn, chunk_size=32).roundtrip)(x, (), None)[0]
  xn = np.asarray(x, np.float64)
  assert np.asarray(raw)[1] == 0 and np.asarray(raw)[3] == 0  # underflowed
  # e4m3 normals: 3 mantissa bits, half an ulp is 2**-4 relative.
  rel = np.abs(np.asarray(scaled, np.float64) - xn) / np.abs(xn)
  assert rel.max() <= 2.0**-4
  assert not C.cast(jnp.float8_e4m3fn).summable and C.cast(jnp.bfloat16).summable
  assert not C.cast(jnp.bfloat16, chunk_size=8).summable


# -- stochastic rounding --------------------------------------------------------------


def _max_z(c, x, draws=2000):
  """Largest |z| of the mean of ``draws`` decodes against ``x``, elementwise."""
  keys = jax.random.split(jax.random.PRNGKey(7), draws)
  state = c.init(x.shape, x.dtype)
  samples = jax.jit(jax.vmap(lambda k: c.roundtrip(x, state, k)[0]))(keys)
  s = np.asarray(samples, np.float64)
  mean, sem = s.mean(0), s.std(0, ddof=1) / np.sqrt(draws)
  gap = np.abs(mean - np.asarray(x, np.float64))
  # An element that never varies is zero or its chunk's largest, on the top
  # level: x to within the scale's rounding up.
  same = np.isclose(mean, np.asarray(x, np.float64), rtol=1e-6, atol=0)
  z = np.where(sem > 0, gap / np.where(sem > 0, sem, 1.0), np.where(same, 0, np.inf))
  return float(z.max())


X_UNBIASED = (
  jnp.concatenate(
    [jax.random.normal(KEY, (40,)), jnp.array([0.0, 0.05, -5.0, 0.3, 0.3])]
  )
  * 1e-3
)


@pytest.mark.parametrize(
  "c",
  [
    C.quantize(2, chunk_size=16, rounding="stochastic"),
    C.quantize(4, chunk_size=8, rounding="stochastic"),
    C.compose(C.random_k(0.5), values=C.quantize(2, rounding="stochastic")),
  ],
  ids=["int2", "int4", "random_k+int2"],
)
def test_stochastic_rounding_is_unbiased_and_nearest_is_not(c):
  assert c.unbiased and c.stochastic
  # 45 elements: a |z| above 5 has probability below 3e-5 for an unbiased one.
  assert _max_z(c, X_UNBIASED) < 5.0
  assert _max_z(C.quantize(2, chunk_size=16), X_UNBIASED, draws=50) > 8.0


# -- bit packing ----------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 150), bits=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_pack_fields_round_trips_and_matches_the_documented_stream(n, bits, seed):
  codes = np.random.default_rng(seed).integers(0, 1 << bits, n)
  dtype = np.uint8 if bits <= 8 else np.uint32

  @jax.jit
  def both(c):
    packed = pack_fields(c, bits)
    return packed, unpack_fields(packed, bits, n)

  packed, back = jax.tree.map(np.asarray, both(jnp.asarray(codes, dtype)))
  assert packed.dtype == np.uint8 and packed.shape == (_ceil(n * bits, 8),)
  np.testing.assert_array_equal(np_unpack(packed, bits, n), codes)
  assert back.dtype == dtype
  np.testing.assert_array_equal(back, codes)


@settings(max_examples=8, deadline=None)
@given(
  n=st.integers(1, 300),
  chunk=st.sampled_from([2, 3, 8, 64]),
  bits=st.sampled_from([2, 4]),
  k=st.integers(1, 3),
)
def test_round_trips_on_sizes_off_the_chunk_and_the_byte(n, chunk, bits, k):
  x = jax.random.normal(jax.random.PRNGKey(n), (n,))
  xn = np.asarray(x)
  k = min(k, chunk)
  q = C.quantize(bits, chunk_size=chunk)
  s = C.chunked_top_k(k, chunk_size=chunk)

  @jax.jit
  def both(x):
    return q.roundtrip(x, (), None)[:2], s.roundtrip(x, (), None)[0]

  (q_hat, payload), s_hat = both(x)
  _, want = np_level_decode(jax.tree.map(np.asarray, payload), bits, chunk, n)
  np.testing.assert_array_equal(np.asarray(q_hat), want)
  pos, vals = np_chunk_top_k(xn, k, chunk)
  np.testing.assert_array_equal(np.asarray(s_hat), np_scatter(pos, vals, n))


# -- jit, vmap, zeros and non-finite inputs -------------------------------------------

SOME = {
  "int4": lambda: C.quantize(4),
  "int2_stochastic": lambda: C.quantize(2, rounding="stochastic"),
  "float8_e4m3fn": lambda: C.cast(jnp.float8_e4m3fn, chunk_size=32),
  "chunked_top_k": lambda: C.chunked_top_k(2),
  "chunked_top_k+int2": lambda: C.compose(C.chunked_top_k(2), values=C.quantize(2)),
}


@pytest.mark.parametrize("name", sorted(SOME))
def test_eager_jit_and_vmap_agree(name):
  c = SOME[name]()
  xs = jax.random.normal(KEY, (3, 200)) * 1e-3
  keys = jax.random.split(KEY, 3)
  state = c.init((200,), F32)
  one = lambda x, k: c.roundtrip(x, state, k)[0]
  batched = jax.jit(jax.vmap(one))(xs, keys)
  jitted = jax.jit(one)
  for i in range(3):
    np.testing.assert_array_equal(
      np.asarray(batched[i]), np.asarray(jitted(xs[i], keys[i]))
    )
  np.testing.assert_array_equal(np.asarray(batched[0]), np.asarray(one(xs[0], keys[0])))


@pytest.mark.parametrize("name", sorted(SOME))
def test_zeros_decode_to_zeros_and_non_finite_stays_non_finite(name):
  c = SOME[name]()
  zeros = jnp.zeros((100,))
  out = jax.jit(c.roundtrip)(zeros, c.init((100,), F32), KEY)[0]
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  # As for qsgd: a NaN or infinity decodes non-finite where it was, so that
  # the compressing transforms, which check the decoded update, skip the step.
  x = jnp.linspace(-1.0, 1.0, 100).at[3].set(jnp.nan).at[70].set(jnp.inf)
  out = np.asarray(jax.jit(c.roundtrip)(x, c.init((100,), F32), KEY)[0])
  assert not np.isfinite(out[3]) and not np.isfinite(out[70])
  tx = C.compress(c, key=1)
  g = {"w": x}
  u, state = jax.jit(tx.update)(g, tx.init(g))
  np.testing.assert_array_equal(np.asarray(u["w"]), 0.0)  # skipped
  np.testing.assert_array_equal(np.asarray(state.feedback["w"]), 0.0)


# -- bad arguments --------------------------------------------------------------------


BAD = [
  (lambda: C.quantize(3), r"quantize\(bits=3\) must be one of \(2, 4, 8\)"),
  (lambda: C.quantize(4, chunk_size=0), r"quantize\(chunk_size=0\) must be an int"),
  (lambda: C.quantize(rounding="up"), r"quantize\(rounding='up'\) must be one of"),
  (lambda: C.cast(jnp.float8_e4m3fn, chunk_size=0), r"cast\(chunk_size=0\) must"),
  (lambda: C.cast(jnp.float8_e5m2, chunk_size=2.0), r"cast\(chunk_size=2.0\)"),
  (lambda: C.chunked_top_k(0), r"chunked_top_k\(k=0\) must be an int >= 1"),
  (lambda: C.chunked_top_k(65), r"chunked_top_k\(k=65\) must be at most chunk_size=64"),
  (lambda: C.chunked_top_k(1, chunk_size=1), r"chunked_top_k\(chunk_size=1\) must"),
  (lambda: C.chunked_top_k(value_dtype=jnp.int8), r"chunked_top_k\(value_dtype="),
  (
    lambda: C.compose(C.sign(), values=C.quantize()),
    r"compose\(outer='sign'\): its payload .* has no 'values' array",
  ),
  (
    lambda: C.compose(C.powersgd(1), values=C.quantize()),
    r"compose\(outer='powersgd'\) runs its own rounds",
  ),
]


@pytest.mark.parametrize("make, message", BAD)
def test_bad_arguments_raise_naming_the_call_argument_and_value(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_compose_needs_compressors():
  with pytest.raises(TypeError, match=r"compose\(values='int8'\) must be a Comp"):
    C.compose(C.top_k(0.1), values="int8")
  with pytest.raises(TypeError, match=r"compose\(outer=None\) must be a Comp"):
    C.compose(None, values=C.quantize())


# -- compose in compress and compressed_mean, against numpy ---------------------------


def np_sparseloco(a, k=2, chunk=16, bits=2, qchunk=8):
  """chunked top-k then nearest quantization of the values, decoded: numpy."""
  pos, vals = np_chunk_top_k(a, k, chunk)
  lv, scales = np_quantize(vals, bits, qchunk)
  vals_hat = (lv * scales[np.arange(vals.size) // qchunk]).astype(F32)
  return np_scatter(pos, vals_hat, a.size)


def _sparseloco():
  return C.compose(
    C.chunked_top_k(2, chunk_size=16), values=C.quantize(2, chunk_size=8)
  )


def test_compose_in_compress_with_error_feedback_matches_numpy():
  c = _sparseloco()
  tx = C.compress(c, feedback="error_feedback")
  g0 = {"w": jax.random.normal(KEY, (10, 9)) * 1e-3}  # 90: a short last chunk
  state = tx.init(g0)
  update = jax.jit(tx.update)
  e = np.zeros(90, F32)
  for step in range(3):
    g = np.asarray(jax.random.normal(jax.random.PRNGKey(step), (10, 9)), F32) * F32(
      1e-3
    )
    u, state = update({"w": jnp.asarray(g)}, state)
    a = (g.ravel() + e).astype(F32)
    sent = np_sparseloco(a)
    e = (a - sent).astype(F32)
    np.testing.assert_array_equal(np.asarray(u["w"]).ravel(), sent)
    np.testing.assert_array_equal(np.asarray(state.feedback["w"]).ravel(), e)
  stats = C.compression_stats(state)
  # 6 chunks x 2 values: 12 two-bit codes (3 bytes) + 2 scales (8), 12 x 4 bits.
  assert float(stats["chunked_top_k+int2/bytes_sent"]) == 3 + 8 + 6


def test_compose_in_compressed_mean_on_8_devices_matches_numpy():
  c = _sparseloco()
  tx = distributed.compressed_mean(c, "data")
  grads = np.asarray(jax.random.normal(KEY, (N_DEVICES, 90)), F32) * F32(1e-3)
  grads *= np.geomspace(0.5, 4.0, N_DEVICES, dtype=F32)[:, None]
  mesh = Mesh(np.array(jax.devices()[:N_DEVICES]), ("data",))

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=P("data"), out_specs=(P("data"), P()))
  def run(g):
    g = g[0]
    state = tx.init(g)
    outs = []
    for _ in range(2):
      u, state = tx.update(g, state)
      outs.append(u)
    return jnp.stack(outs)[None], C.compression_stats(state)[f"{c.name}/bytes_sent"]

  updates, sent = run(jnp.asarray(grads))
  updates = np.asarray(updates)
  residual = np.zeros_like(grads)
  for step in range(2):
    a = (grads + residual).astype(F32)
    decoded = np.stack([np_sparseloco(a[i]) for i in range(N_DEVICES)])
    residual = (a - decoded).astype(F32)
    want = decoded.astype(np.float64).mean(axis=0)
    for d in range(N_DEVICES):  # every device holds the same mean
      np.testing.assert_array_equal(updates[d, step], updates[0, step])
    np.testing.assert_allclose(updates[0, step], want, rtol=1e-6, atol=1e-12)
  per_device = c.payload_bytes((90,), F32)
  assert per_device == 3 + 8 + 6
  assert float(sent) == (N_DEVICES - 1) * per_device  # all_gather

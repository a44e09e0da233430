"""The compressor interface and the kernels compressors share.

Kernels here: static payload sizes, argument checks that name the call, a
counter-based random stream cheap enough for one draw per element, and bit
packing. Nothing here imports the rest of clipjax.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Shape = tuple[int, ...]
Payload = dict[str, Any]
"""Arrays by name; a composition (:func:`~clipjax.compression.compose`) nests
the inner compressor's payload under ``"values"``."""


@dataclasses.dataclass(frozen=True)
class Compressor:
  """Pure functions that encode one array into a payload and decode it back.

  A compressor never sees a pytree: :func:`~clipjax.compress` (one process)
  and the device-mesh exchange apply it leaf by leaf. Every function is pure and
  traceable (jit, vmap); every payload array has a shape fixed by the leaf's
  shape, so ``payload_bytes`` is known before anything runs.

  Attributes:
    name: a short name, used in statistics (``"top_k"``).
    init: ``init(shape, dtype) -> state``: the per-leaf state, a pytree of
      arrays (PowerSGD's ``Q``; ``()`` for stateless compressors). Deterministic,
      so every worker starts from the same state.
    encode: ``encode(x, state, key) -> (payload, state)``: ``payload`` is a dict
      of arrays, exactly what travels. ``key`` is a PRNG key (raw ``uint32``
      data or a typed key); deterministic compressors ignore it.
    decode: ``decode(payload, shape, dtype, state, key) -> x_hat``: ``state`` is
      the state ``encode`` returned and ``key`` the key it was given (random-k
      regenerates its indices from it, so they never travel).
    payload_bytes: ``payload_bytes(shape, dtype) -> int``: the exact bytes of the
      payload, ``sum(a.size * a.dtype.itemsize)`` over its arrays (for PowerSGD
      with several power iterations, the factors of every round).
    summable: true if payloads of several workers, encoded with the same key and
      state, may be summed (``psum``) before decoding: ``decode`` is linear in
      the payload. False: gather the payloads and decode each (top-k,
      quantizers).
    stochastic: true if ``encode`` draws from ``key``.
    unbiased: true if ``E[decode(encode(x))] == x`` over keys.
    reduce: only for multi-round methods (PowerSGD): ``reduce(x, state, key,
      mean_fn) -> (mean_hat, local_hat, state)`` runs the whole exchange with
      ``mean_fn`` averaging a factor over workers (identity on one process,
      ``lambda t: jax.lax.pmean(t, axis_name)`` on a mesh). ``mean_hat`` is the
      decoded mean, ``local_hat`` this worker's own contribution (what error
      feedback subtracts). ``None`` for single-round compressors.

  Examples:
    The scaled sign compressor, one step at a time:

    >>> import math
    >>> import jax.numpy as jnp
    >>> from clipjax import compression
    >>> c = compression.sign()
    >>> x = jnp.array([1.0, -3.0, 2.0, -2.0])
    >>> payload, state = c.encode(x, c.init(x.shape, x.dtype), None)
    >>> print(payload["signs"], payload["scale"])  # bits 1 and 3 set: 0b1010
    [10] 2.0
    >>> print(c.decode(payload, x.shape, x.dtype, state, None))
    [ 2. -2.  2. -2.]
    >>> c.payload_bytes(x.shape, x.dtype), c.summable, c.stochastic, c.unbiased
    (5, False, False, False)

    A compressor of one's own, here sending float32 leaves as bfloat16:

    >>> half = compression.Compressor(
    ...   name="half",
    ...   init=lambda shape, dtype: (),
    ...   encode=lambda x, state, key: ({"x": x.astype(jnp.bfloat16)}, state),
    ...   decode=lambda p, shape, dtype, state, key: p["x"].astype(dtype),
    ...   payload_bytes=lambda shape, dtype: 2 * math.prod(shape),
    ...   summable=True,
    ...   stochastic=False,
    ...   unbiased=False,
    ... )
    >>> tx = compression.compress(half, feedback=None)
    >>> g = {"w": jnp.array([1.0, 1.0 / 3.0])}
    >>> u, state = tx.update(g, tx.init(g))
    >>> print(u["w"], state.stats.ratio)
    [1. 0.333984] 2.0
  """

  name: str
  init: Callable[[Shape, Any], Any]
  encode: Callable[[jax.Array, Any, jax.Array], tuple[Payload, Any]]
  decode: Callable[[Payload, Shape, Any, Any, jax.Array], jax.Array]
  payload_bytes: Callable[[Shape, Any], int]
  summable: bool
  stochastic: bool
  unbiased: bool
  reduce: Callable[..., tuple[jax.Array, jax.Array, Any]] | None = None

  def roundtrip(
    self, x: jax.Array, state: Any, key: jax.Array
  ) -> tuple[jax.Array, Payload, Any]:
    """``decode(encode(x))``: returns ``(x_hat, payload, new_state)``.

    Examples:
      >>> import jax, jax.numpy as jnp, clipjax
      >>> c = clipjax.compression.sign()
      >>> x = jnp.array([1.0, -3.0, 2.0, 0.0])
      >>> x_hat, payload, _ = c.roundtrip(x, c.init(x.shape, x.dtype), None)
      >>> print(x_hat, payload["signs"], c.payload_bytes(x.shape, x.dtype))
      [ 1.5 -1.5  1.5  1.5] [2] 5
    """
    payload, state = self.encode(x, state, key)
    payload = wire(payload)
    return self.decode(payload, x.shape, x.dtype, state, key), payload, state


def wire(payload: Payload) -> Payload:
  """The payload as a receiver gets it: asks XLA not to fuse it into decoding.

  Fused, XLA may recompute a packed byte's inputs once per element it holds.
  A collective between encoding and decoding materializes the payload anyway;
  on one process this barrier is only a request (XLA:CPU drops it).
  """
  return lax.optimization_barrier(payload)


def nbytes(payload: Any) -> int:
  """Bytes held by the arrays of a payload (or of abstract shapes of one)."""
  return sum(
    int(np.prod(a.shape, dtype=np.int64)) * jnp.dtype(a.dtype).itemsize
    for a in jax.tree.leaves(payload)
  )


def numel(shape: Shape) -> int:
  return int(np.prod(shape, dtype=np.int64))


def count_of(ratio: float, n: int) -> int:
  """``k = max(1, ceil(ratio * n))``, at most ``n``.

  ``ratio * n`` is rounded to 6 decimals first, so that ``0.07 * 100`` (which
  is ``7.000000000000001`` in floating point) gives 7, not 8.

  Examples:
    >>> from clipjax.compression._base import count_of
    >>> count_of(0.07, 100), count_of(0.001, 10), count_of(1.0, 5)
    (7, 1, 5)
  """
  return min(n, max(1, math.ceil(round(ratio * n, 6))))


def check_ratio(call: str, ratio: Any) -> float:
  """A Python number in (0, 1], else ``ValueError`` naming the call."""
  ok = isinstance(ratio, int | float | np.floating | np.integer) and not isinstance(
    ratio, bool
  )
  if not ok or not 0.0 < float(ratio) <= 1.0:
    raise ValueError(f"{call}(ratio={ratio!r}) must be in (0, 1].")
  return float(ratio)


def check_unit(call: str, name: str, value: Any) -> float:
  """A Python number in [0, 1], else ``ValueError`` naming the call."""
  ok = isinstance(value, int | float | np.floating | np.integer) and not isinstance(
    value, bool
  )
  if not ok or not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"{call}({name}={value!r}) must be a number in [0, 1].")
  return float(value)


def check_int(call: str, name: str, value: Any, minimum: int) -> int:
  """A Python int >= ``minimum``, else ``ValueError`` naming the call."""
  if (
    not isinstance(value, int | np.integer)
    or isinstance(value, bool)
    or value < minimum
  ):
    raise ValueError(f"{call}({name}={value!r}) must be an int >= {minimum}.")
  return int(value)


def check_choice(call: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{call}({name}={value!r}) must be one of {choices}.")


def check_float_dtype(call: str, name: str, dtype: Any) -> np.dtype:
  """A floating-point dtype, else ``ValueError`` naming the call."""
  try:
    resolved = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"{call}({name}={dtype!r}) must be a floating-point dtype.") from e
  if not jnp.issubdtype(resolved, jnp.floating):
    raise ValueError(f"{call}({name}={dtype!r}) must be a floating-point dtype.")
  return resolved


def values_dtype_of(call: str, value_dtype: Any) -> Callable[[Any], np.dtype]:
  """``value_dtype=`` checked at construction: the function from a leaf's dtype
  to the dtype its values travel in (the leaf's own when ``None``)."""
  wire = (
    None if value_dtype is None else check_float_dtype(call, "value_dtype", value_dtype)
  )

  def values_dtype(dtype: Any) -> np.dtype:
    return jnp.dtype(dtype) if wire is None else wire

  return values_dtype


def stateless(shape: Shape, dtype: Any) -> tuple[()]:
  """``init`` of a compressor that keeps no state."""
  del shape, dtype
  return ()


def compute_dtype(dtype: Any) -> np.dtype:
  """float32 for half precision and float32, float64 for float64."""
  dtype = jnp.dtype(dtype)
  return dtype if dtype == jnp.dtype(jnp.float64) else jnp.dtype(jnp.float32)


# -- a counter-based random stream ------------------------------------------------
#
# jax.random (threefry) costs about fifty memory passes per element on CPU, which
# would make every stochastic quantizer ten times slower than the memory traffic
# it saves, and a threefry per group of leaves is a large share of a compressor's
# compiled program. Stochastic rounding and index sampling need only uniform
# marginals: each element's bits are two rounds of MurmurHash3's finalizer (a
# bijection of uint32) over its index, keyed by 64 bits mixed from the key's own
# data. The keys compress gives are threefry outputs already (fold_in of the
# step's key), so no further threefry is drawn; for a uniformly random key each
# element's draw is exactly uniform; XLA fuses the hash into the quantizer's loop.


def _fmix32(h: jax.Array) -> jax.Array:
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hash_seeds(key: jax.Array) -> jax.Array:
  """Two ``uint32`` words from ``key`` (raw key data or a typed key): the seed of
  :func:`hash_bits`.

  The key's data words, each mixed with the others through the finalizer, so
  that keys differing in one bit (``PRNGKey(0)``, ``PRNGKey(1)``) give unrelated
  seeds. Elementwise on a few words: no threefry.

  Examples:
    >>> import jax
    >>> from clipjax.compression._base import hash_seeds
    >>> a, b = hash_seeds(jax.random.PRNGKey(0)), hash_seeds(jax.random.key(0))
    >>> print(a.dtype, a.shape, bool((a == b).all()))
    uint32 (2,) True
  """
  if jax.dtypes.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  words = jnp.asarray(key).astype(jnp.uint32).reshape(-1)
  low, high = jnp.uint32(0x9E3779B9), jnp.uint32(0x7F4A7C15)
  for i in range(words.shape[0]):
    low = _fmix32(low ^ words[i])
    high = _fmix32(high ^ words[words.shape[0] - 1 - i])
  return jnp.stack([low, _fmix32(high ^ low)])


def hash_bits(seeds: jax.Array, index: jax.Array) -> jax.Array:
  """``uint32`` bits for each ``uint32`` counter in ``index``, keyed by ``seeds``."""
  return _fmix32(_fmix32((index * jnp.uint32(0x9E3779B9)) ^ seeds[0]) ^ seeds[1])


def random_bits(key: jax.Array, shape: Shape) -> jax.Array:
  """``uint32`` bits of ``shape``, one draw per element (row-major counters)."""
  index = lax.iota(jnp.uint32, numel(shape)).reshape(shape)
  return hash_bits(hash_seeds(key), index)


def uniform01(bits: jax.Array) -> jax.Array:
  """float32 in ``[0, 1)`` from the top 23 bits (multiples of ``2**-23``)."""
  one = lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32)
  return one - jnp.float32(1.0)


def random_below(key: jax.Array, span: jax.Array | int, shape: Shape) -> jax.Array:
  """int32 in ``[0, span)`` of ``shape`` (``span`` broadcasts, ``1 <= span < 2**31``).

  Two 32-bit draws per element combined as ``jax.random.randint`` combines
  them, ``(hi % span) * (2**32 % span) + lo % span`` taken ``% span``: for
  ``span <= 2**16`` each value's probability is ``1 / span`` to about
  ``span / 2**64``.

  Examples:
    >>> import jax
    >>> from clipjax.compression._base import random_below
    >>> r = random_below(jax.random.PRNGKey(0), jax.numpy.arange(1, 6), (5,))
    >>> print(r.dtype, bool(((r >= 0) & (r < jax.numpy.arange(1, 6))).all()))
    int32 True
  """
  seeds = hash_seeds(key)
  index = lax.iota(jnp.uint32, numel(shape)).reshape(shape) * jnp.uint32(2)
  hi, lo = hash_bits(seeds, index), hash_bits(seeds, index + jnp.uint32(1))
  span = jnp.asarray(span).astype(jnp.uint32)
  mult = lax.rem(jnp.uint32(1 << 16), span)
  mult = lax.rem(mult * mult, span)
  offset = lax.rem(hi, span) * mult + lax.rem(lo, span)
  return lax.rem(offset, span).astype(jnp.int32)


def random_normal(key: jax.Array, shape: Shape) -> jax.Array:
  """float32 standard normals of ``shape``: ``sqrt(2) * erfinv(u)`` with ``u``
  uniform on the ``2**23`` odd multiples of ``2**-23`` in ``(-1, 1)``, as
  ``jax.random.normal`` draws them from a finer uniform (tails end at 5.3)."""
  u = uniform01(random_bits(key, shape)) * jnp.float32(2.0) + jnp.float32(2.0**-23 - 1)
  return jnp.float32(np.sqrt(2.0)) * lax.erf_inv(u)


# -- bit packing -------------------------------------------------------------------


def pack_bits(flags: jax.Array) -> jax.Array:
  """1-D booleans -> ``uint8``, 8 per byte, first element in the lowest bit."""
  return jnp.packbits(flags, bitorder="little")


def unpack_bits(packed: jax.Array, n: int) -> jax.Array:
  """Inverse of :func:`pack_bits`: the first ``n`` bits as ``uint8`` 0/1."""
  return jnp.unpackbits(packed, count=n, bitorder="little")


def packed_size(n: int, bits: int) -> int:
  """Bytes that :func:`pack_fields` makes of ``n`` codes of ``bits`` bits."""
  return -(-n * bits // 8)


def pack_fields(codes: jax.Array, bits: int) -> jax.Array:
  """1-D unsigned codes below ``2**bits`` -> a ``uint8`` bit stream.

  Code ``i`` occupies bits ``i * bits`` to ``(i + 1) * bits - 1`` of the
  stream, least significant bit first, and the stream fills each byte from its
  lowest bit, as :func:`pack_bits` does (``bits=1`` is that packing): for
  ``bits`` dividing 8, byte ``j`` holds codes ``j * 8 // bits`` onwards, the
  first in its lowest bits. The last byte is padded with zero bits:
  ``ceil(n * bits / 8)`` bytes (:func:`packed_size`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipjax.compression._base import pack_fields, unpack_fields
    >>> packed = pack_fields(jnp.array([1, 2, 3], jnp.uint8), 4)
    >>> print(packed, unpack_fields(packed, 4, 3))  # 0x21, 0x03
    [33  3] [1 2 3]
    >>> packed = pack_fields(jnp.array([5, 63, 0, 17]), 6)  # 24 bits
    >>> print(packed, unpack_fields(packed, 6, 4))
    [197 15 68] [ 5 63  0 17]
  """
  n = codes.shape[0]
  if 8 % bits == 0:
    per = 8 // bits
    m = -(-n // per)
    c = codes.astype(jnp.uint8)
    if m * per > n:
      c = jnp.pad(c, (0, m * per - n))
    c = c.reshape(m, per)
    out = c[:, 0]
    for j in range(1, per):
      out = out | (c[:, j] << jnp.uint8(j * bits))
    return out
  shifts = jnp.arange(bits, dtype=jnp.uint32)
  flags = (codes.astype(jnp.uint32)[:, None] >> shifts) & jnp.uint32(1)
  return pack_bits(flags.astype(jnp.bool_).reshape(-1))


def unpack_fields(packed: jax.Array, bits: int, n: int) -> jax.Array:
  """Inverse of :func:`pack_fields`: ``n`` codes, ``uint8`` for ``bits <= 8``,
  else ``uint32``."""
  if 8 % bits == 0:
    shifts = jnp.arange(0, 8, bits, dtype=jnp.uint8)
    fields = (packed[:, None] >> shifts) & jnp.uint8((1 << bits) - 1)
    return fields.reshape(-1)[:n]
  flags = unpack_bits(packed, n * bits).reshape(n, bits).astype(jnp.uint32)
  codes = flags[:, 0]
  for j in range(1, bits):
    codes = codes | (flags[:, j] << jnp.uint32(j))
  return codes.astype(jnp.uint8) if bits <= 8 else codes


def pack_planar(codes: jax.Array, bits: int) -> jax.Array:
  """Rows of codes below ``2**bits`` (``bits`` 1, 2 or 4) -> ``uint8``, planar.

  A row of ``s`` codes becomes ``q = ceil(s * bits / 8)`` bytes, byte ``i``
  holding the row's codes ``i``, ``i + q``, ``i + 2q``, ... from its lowest
  bits up (zero bits where the row ends). Each slot reads a contiguous run of
  the row, which XLA:CPU vectorizes; interleaved codes (``2i``, ``2i + 1``)
  made a stochastic 4-bit quantizer's encoding about seven times slower.

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipjax.compression._base import pack_planar, unpack_planar
    >>> packed = pack_planar(jnp.array([[1, 2, 3]], jnp.uint8), 4)
    >>> print(packed, unpack_planar(packed, 4, 3))  # 0x31, 0x02
    [[49  2]] [[1 2 3]]
  """
  per = 8 // bits
  rows, s = codes.shape
  q = -(-s // per)
  c = codes.astype(jnp.uint8)
  if q * per > s:
    c = jnp.pad(c, ((0, 0), (0, q * per - s)))
  out = c[:, :q]
  for j in range(1, per):
    out = out | (c[:, j * q : (j + 1) * q] << jnp.uint8(j * bits))
  return out.reshape(rows, q)


def unpack_planar(packed: jax.Array, bits: int, s: int) -> jax.Array:
  """Inverse of :func:`pack_planar`: rows of ``s`` ``uint8`` codes."""
  shifts = jnp.arange(0, 8, bits, dtype=jnp.uint8)[:, None]
  fields = (packed[:, None, :] >> shifts) & jnp.uint8((1 << bits) - 1)
  return fields.reshape(packed.shape[0], -1)[:, :s]


# -- chunked top-k -----------------------------------------------------------------
#
# chunked_top_k and dct_top_k send the same payload: the k largest magnitudes of
# each chunk, chunk after chunk, and their positions in the chunk, bit-packed.


def check_chunked_k(call: str, k: Any, chunk_size: Any) -> tuple[int, int]:
  """``k`` in ``[1, chunk_size]`` and ``chunk_size >= 2``, else ``ValueError``."""
  chunk_size = check_int(call, "chunk_size", chunk_size, 2)
  k = check_int(call, "k", k, 1)
  if k > chunk_size:
    raise ValueError(f"{call}(k={k!r}) must be at most chunk_size={chunk_size}.")
  return k, chunk_size


def index_bits(chunk_size: int) -> int:
  """The bits of one in-chunk position: ``ceil(log2(chunk_size))``."""
  return (chunk_size - 1).bit_length()


def chunk_count(n: int, chunk_size: int) -> int:
  return -(-n // chunk_size)


def to_chunks(flat: jax.Array, chunk_size: int) -> jax.Array:
  """A 1-D array as rows of ``chunk_size``, the last one padded with zeros."""
  n = flat.shape[0]
  c = chunk_count(n, chunk_size)
  if c * chunk_size > n:
    flat = jnp.pad(flat, (0, c * chunk_size - n))
  return flat.reshape(c, chunk_size)


def top_k_of_chunks(rows: jax.Array, k: int, value_dtype: Any) -> Payload:
  """Each row's ``k`` largest ``|x|``: ``{"values", "indices"}``, the values in
  ``value_dtype`` row after row, largest first, their positions in the row
  packed by :func:`pack_fields` in :func:`index_bits` bits each."""
  _, idx = lax.top_k(jnp.abs(rows), k)
  vals = jnp.take_along_axis(rows, idx, axis=1).reshape(-1)
  return {
    "values": vals.astype(value_dtype),
    "indices": pack_fields(idx.reshape(-1), index_bits(rows.shape[1])),
  }


def from_top_k_of_chunks(
  payload: Payload, c: int, k: int, chunk_size: int, dtype: Any
) -> jax.Array:
  """Inverse of :func:`top_k_of_chunks`: the ``c`` rows, flat, zeros elsewhere."""
  idx = unpack_fields(payload["indices"], index_bits(chunk_size), c * k)
  starts = jnp.arange(c, dtype=jnp.int32)[:, None] * chunk_size
  pos = (idx.astype(jnp.int32).reshape(c, k) + starts).reshape(-1)
  vals = payload["values"].astype(dtype)
  return jnp.zeros((c * chunk_size,), dtype).at[pos].set(vals, unique_indices=True)


def top_k_of_chunks_bytes(c: int, k: int, chunk_size: int, value_itemsize: int) -> int:
  """The bytes of :func:`top_k_of_chunks`'s payload for ``c`` rows."""
  m = c * k
  return m * value_itemsize + packed_size(m, index_bits(chunk_size))

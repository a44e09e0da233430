"""Single-round compressors: sparsifiers, quantizers and casts.

Each factory checks its hyperparameters and returns a :class:`Compressor` of
pure functions over one array. Payload sizes depend only on the leaf's shape
and dtype (``n`` elements below), never on its values.
"""

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

from clipjax.compression._base import (
  Compressor,
  Payload,
  check_choice,
  check_chunked_k,
  check_float_dtype,
  check_int,
  check_ratio,
  chunk_count,
  compute_dtype,
  count_of,
  from_top_k_of_chunks,
  hash_bits,
  hash_seeds,
  numel,
  pack_bits,
  pack_planar,
  packed_size,
  random_below,
  random_bits,
  stateless,
  to_chunks,
  top_k_of_chunks,
  top_k_of_chunks_bytes,
  uniform01,
  unpack_bits,
  unpack_planar,
  values_dtype_of,
)

_F32 = jnp.float32


# -- top-k -------------------------------------------------------------------------

# Sampled selection: the threshold is the |x| that a random sample exceeds
# _SAMPLE_TOP * _TARGET times, which estimates the count above it with a relative
# error of about 1/sqrt(_SAMPLE_TOP * _TARGET) (4.7%). Aiming at 7/8 of k puts the
# k slots 2.8 standard errors away, so they overflow rarely.
_SAMPLE_TOP = 512
_TARGET = 0.875


def sample_size(ratio: float, n: int) -> int:
  """How many elements ``top_k(ratio, selection="sampled")`` samples of ``n``."""
  return min(n, math.ceil(_SAMPLE_TOP / ratio))


def first_true(mask: jax.Array, k: int) -> jax.Array:
  """Positions of the first ``k`` true elements of a 1-D mask, in order.

  Slots beyond the number of true elements hold ``mask.size`` (one past the end,
  dropped by a scatter with ``mode="drop"``). The mask is packed into 32-bit
  words, whose population counts and their prefix sum locate each slot's word
  (a binary search per slot) and a five-step search its bit. Unlike
  ``jnp.nonzero(mask, size=k)``, whose prefix sum runs over every element, the
  only full-size pass is the packing.

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipjax.compression._compressors import first_true
    >>> print(first_true(jnp.array([False, True, True, False, True]), 4))
    [1 2 4 5]
  """
  n = mask.shape[0]
  packed = pack_bits(mask)
  pad = -packed.shape[0] % 4
  if pad:
    packed = jnp.concatenate([packed, jnp.zeros((pad,), jnp.uint8)])
  b = packed.reshape(-1, 4).astype(jnp.uint32)
  words = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)
  counts = lax.population_count(words).astype(jnp.int32)
  ends = jnp.cumsum(counts)
  slot = jnp.arange(k, dtype=jnp.int32)
  word = jnp.searchsorted(ends, slot, side="right").astype(jnp.int32)
  word = jnp.minimum(word, words.shape[0] - 1)
  rank = slot - (ends[word] - counts[word])
  bits = words[word]
  pos = jnp.zeros((k,), jnp.int32)
  for width in (16, 8, 4, 2, 1):
    window = (bits >> pos.astype(jnp.uint32)) & jnp.uint32((1 << width) - 1)
    below = lax.population_count(window).astype(jnp.int32)
    skip = rank >= below
    pos = pos + jnp.where(skip, width, 0)
    rank = rank - jnp.where(skip, below, 0)
  return jnp.where(slot < ends[-1], word * 32 + pos, n)


def _sampled_indices(flat: jax.Array, k: int, ratio: float, key: jax.Array):
  n = flat.shape[0]
  s = sample_size(ratio, n)
  sample = jnp.abs(flat[random_below(key, n, (s,))])
  c = max(1, round(_TARGET * k * s / n))
  # The c-th largest as the smallest of the c largest: indexing top_k's output
  # at c - 1 makes XLA:CPU rewrite it into a path a hundred times slower.
  threshold = jnp.min(lax.top_k(sample, c)[0])
  mag = jnp.abs(flat)
  return first_true((mag >= threshold) & (mag > 0), k)


def top_k(
  ratio: float,
  *,
  selection: Literal["exact", "sampled"] = "exact",
  value_dtype: Any = None,
) -> Compressor:
  """Sends the ``k = max(1, ceil(ratio * n))`` entries of largest magnitude.

  Payload: ``values`` (``k``, in ``value_dtype`` or the leaf's dtype) and
  ``indices`` (``k``, int32), so ``k * (itemsize + 4)`` bytes.

  ``selection="exact"`` takes the ``k`` largest ``|x|`` with ``lax.top_k``
  (ties broken by ``lax.top_k``). ``selection="sampled"`` estimates the
  threshold from a random sample of ``ceil(512 / ratio)`` elements, aiming at
  ``7/8 * k`` elements above it as Deep Gradient Compression does, and keeps the
  first ``k`` in index order of those at or above it (nonzero ones only); empty
  slots hold value 0 and index ``n``. It skips the sort over every element,
  which costs ``lax.top_k`` tens of memory passes. A leaf no larger than the
  sample uses exact selection.

  Args:
    ratio: the fraction of entries sent, in (0, 1].
    selection: ``"exact"`` or ``"sampled"``.
    value_dtype: the dtype values travel in (e.g. ``jnp.bfloat16``); ``None``
      keeps the leaf's dtype.

  Returns:
    A :class:`Compressor` (not summable: indices differ between workers).

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipjax import compression
    >>> c = compression.top_k(0.5)
    >>> x = jnp.array([0.5, -4.0, 1.0, 3.0])
    >>> x_hat, payload, _ = c.roundtrip(x, (), None)
    >>> print(x_hat, payload["indices"], c.payload_bytes(x.shape, x.dtype))
    [ 0. -4.  0.  3.] [1 3] 16

  References:
    Stich, Cordonnier and Jaggi, `Sparsified SGD with memory
    <https://arxiv.org/abs/1809.07599>`_, 2018; Lin et al., `Deep gradient
    compression <https://arxiv.org/abs/1712.01887>`_, 2018.
  """
  call = "top_k"
  ratio = check_ratio(call, ratio)
  check_choice(call, "selection", selection, ("exact", "sampled"))
  values_dtype = values_dtype_of(call, value_dtype)
  sampled = selection == "sampled"

  def encode(x, state, key):
    flat = x.reshape(-1)
    n = flat.shape[0]
    k = count_of(ratio, n)
    if sampled and sample_size(ratio, n) < n:
      idx = _sampled_indices(flat, k, ratio, key)
      vals = jnp.where(
        idx < n, flat[jnp.minimum(idx, n - 1)], jnp.zeros((), flat.dtype)
      )
    else:
      _, idx = lax.top_k(jnp.abs(flat), k)
      vals = flat[idx]
    payload = {"values": vals.astype(values_dtype(x.dtype)), "indices": idx}
    return payload, state

  def decode(payload, shape, dtype, state, key):
    del state, key
    out = jnp.zeros((numel(shape),), dtype)
    vals = payload["values"].astype(dtype)
    return out.at[payload["indices"]].add(vals, mode="drop").reshape(shape)

  def payload_bytes(shape, dtype):
    k = count_of(ratio, numel(shape))
    return k * (values_dtype(dtype).itemsize + 4)

  return Compressor(
    name=call,
    init=stateless,
    encode=encode,
    decode=decode,
    payload_bytes=payload_bytes,
    summable=False,
    stochastic=sampled,
    unbiased=False,
  )


def chunked_top_k(
  k: int = 2, *, chunk_size: int = 64, value_dtype: Any = None
) -> Compressor:
  """Sends the ``k`` entries of largest magnitude of every chunk of ``chunk_size``.

  The flat leaf is cut into ``c = ceil(n / chunk_size)`` chunks (the last one
  padded with zeros, which are never sent ahead of a nonzero entry and decode
  nowhere). Each chunk sends its ``k`` largest ``|x|`` (ties broken by
  ``lax.top_k``) and their positions within the chunk, in the fewest bits
  that hold them: ``b = ceil(log2(chunk_size))`` (6 for 64, 12 for 4096).

  Payload: ``values`` (``c * k``, in ``value_dtype`` or the leaf's dtype,
  chunk by chunk, largest first) and ``indices`` (the ``c * k`` positions,
  ``b`` bits each, packed as a little-endian bit stream), so ``c * k *
  itemsize + ceil(c * k * b / 8)`` bytes. For float32 values, ``k=2`` of 64
  (3.1% of the entries) sends 0.148 bytes per element, 27x fewer than
  float32; :func:`compose` quantizes the values too (SparseLoCo's 2 bits:
  0.033 bytes per element with ``quantize(2)`` in chunks of 64).

  A fixed count per chunk spreads what is sent over the whole leaf, and needs
  neither a sort of the leaf nor 32-bit indices, as SparseLoCo's and DeMo's
  chunked top-k do.

  Args:
    k: the entries sent per chunk, an int in ``[1, chunk_size]``.
    chunk_size: the elements of one chunk, an int >= 2.
    value_dtype: the dtype values travel in (e.g. ``jnp.bfloat16``); ``None``
      keeps the leaf's dtype.

  Returns:
    A deterministic :class:`Compressor` (not summable: indices differ between
    workers).

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipjax import compression
    >>> c = compression.chunked_top_k(1, chunk_size=4)
    >>> x = jnp.array([0.5, -4.0, 1.0, 3.0, 2.0, 0.0])
    >>> x_hat, payload, _ = c.roundtrip(x, (), None)
    >>> print(x_hat, payload["values"], payload["indices"])  # positions 1, 0
    [ 0. -4.  0.  0.  2.  0.] [-4.  2.] [1]
    >>> c.payload_bytes(x.shape, x.dtype)  # 2 float32 values, 2 x 2 bits
    9

  References:
    Sarfi et al., `Communication efficient LLM pre-training with SparseLoCo
    <https://arxiv.org/abs/2508.15706>`_, 2025; Peng et al., `DeMo: decoupled
    momentum optimization <https://arxiv.org/abs/2411.19870>`_, 2024.
  """
  call = "chunked_top_k"
  k, chunk_size = check_chunked_k(call, k, chunk_size)
  values_dtype = values_dtype_of(call, value_dtype)

  def encode(x, state, key):
    del key
    rows = to_chunks(x.reshape(-1), chunk_size)
    return top_k_of_chunks(rows, k, values_dtype(x.dtype)), state

  def decode(payload, shape, dtype, state, key):
    del state, key
    n = numel(shape)
    c = chunk_count(n, chunk_size)
    return from_top_k_of_chunks(payload, c, k, chunk_size, dtype)[:n].reshape(shape)

  def payload_bytes(shape, dtype):
    c = chunk_count(numel(shape), chunk_size)
    return top_k_of_chunks_bytes(c, k, chunk_size, values_dtype(dtype).itemsize)

  return Compressor(
    name=call,
    init=stateless,
    encode=encode,
    decode=decode,
    payload_bytes=payload_bytes,
    summable=False,
    stochastic=False,
    unbiased=False,
  )


# -- random-k ----------------------------------------------------------------------


def _strata(ratio: float, n: int, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One random index in each of ``k`` contiguous blocks, and the block sizes."""
  k = count_of(ratio, n)
  size, extra = divmod(n, k)
  j = jnp.arange(k, dtype=jnp.int32)
  sizes = size + (j < extra).astype(jnp.int32)
  starts = j * size + jnp.minimum(j, extra)
  return starts + random_below(key, sizes, (k,)), sizes


def random_k(ratio: float, *, unbiased: bool = True) -> Compressor:
  """Sends ``k = max(1, ceil(ratio * n))`` entries at indices drawn from the key.

  The ``n`` elements are cut into ``k`` contiguous blocks of ``n // k`` or
  ``n // k + 1`` elements and one index is drawn uniformly in each (stratified
  sampling: no index repeats, drawing costs ``O(k)``). The indices come from the
  key alone, so only the ``k`` values travel: ``k * itemsize`` bytes. Workers
  given the same key pick the same indices, so their payloads can be summed.

  With ``unbiased=True`` each value is multiplied by its block's size on
  decoding, so ``E[x_hat] = x``, with variance ``(n/k - 1) * ||x||**2``: too
  large for error feedback, which wants a contraction. ``unbiased=False`` sends
  values as they are (each kept with probability ``k/n``); use that with error
  feedback.

  Args:
    ratio: the fraction of entries sent, in (0, 1].
    unbiased: scale the values so that the estimate is unbiased.

  Returns:
    A summable, stochastic :class:`Compressor`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from clipjax import compression
    >>> c = compression.random_k(0.25, unbiased=False)
    >>> x = jnp.arange(1.0, 9.0)
    >>> x_hat, payload, _ = c.roundtrip(x, (), jax.random.PRNGKey(0))
    >>> print(payload["values"].shape, c.payload_bytes(x.shape, x.dtype))
    (2,) 8
    >>> print(int((x_hat != 0).sum()), bool(((x_hat == 0) | (x_hat == x)).all()))
    2 True

  References:
    Stich, Cordonnier and Jaggi, `Sparsified SGD with memory
    <https://arxiv.org/abs/1809.07599>`_, 2018; Wangni et al., `Gradient
    sparsification for communication-efficient distributed optimization
    <https://arxiv.org/abs/1710.09854>`_, 2018.
  """
  call = "random_k"
  ratio = check_ratio(call, ratio)

  def encode(x, state, key):
    flat = x.reshape(-1)
    idx, _ = _strata(ratio, flat.shape[0], key)
    return {"values": flat[idx]}, state

  def decode(payload, shape, dtype, state, key):
    del state
    n = numel(shape)
    idx, sizes = _strata(ratio, n, key)
    vals = payload["values"]
    if unbiased:
      vals = vals.astype(_F32) * sizes.astype(_F32)
    out = jnp.zeros((n,), dtype).at[idx].set(vals.astype(dtype), unique_indices=True)
    return out.reshape(shape)

  def payload_bytes(shape, dtype):
    return count_of(ratio, numel(shape)) * jnp.dtype(dtype).itemsize

  return Compressor(
    name=call,
    init=stateless,
    encode=encode,
    decode=decode,
    payload_bytes=payload_bytes,
    summable=True,
    stochastic=True,
    unbiased=bool(unbiased),
  )


# -- quantizers --------------------------------------------------------------------


def _level_dtype(levels: int) -> Any:
  for dtype in (jnp.int8, jnp.int16):
    if levels <= jnp.iinfo(dtype).max:
      return jnp.dtype(dtype)
  return jnp.dtype(jnp.int32)


def _bucket_max(xb: jax.Array) -> jax.Array:
  """``max |x|`` of each row, as float32.

  One variadic max/min reduction straight over the input: XLA:CPU vectorizes a
  row reduction of an input array, but not of a fused ``|x|`` or ``x**2``,
  which runs about ten times slower.
  """

  def combine(a, b):
    return jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])

  inf = jnp.array(jnp.inf, xb.dtype)
  hi, lo = lax.reduce((xb, xb), (-inf, inf), combine, (1,))
  return jnp.maximum(hi, -lo).astype(_F32)


def _bucket_l2(xb: jax.Array) -> jax.Array:
  """The L2 norm of each row, as float32.

  The squares are taken inside the reduction, so that it still reads the input
  straight (see :func:`_bucket_max`): a pair ``(a, b)`` stands for ``a * b``,
  each element enters as ``(x, x)``, and two pairs combine into ``(a1 * b1 +
  a2 * b2, 1)``, which depends only on what they stand for, so any order of
  reduction gives the sum of squares (rounded as a plain sum would be).
  """

  def combine(p, q):
    return p[0] * p[1] + q[0] * q[1], jnp.ones_like(p[1])

  wide = xb.astype(_F32)
  zero, one = jnp.zeros((), _F32), jnp.ones((), _F32)
  squares, _ = lax.reduce((wide, wide), (zero, one), combine, (1,))
  return jnp.sqrt(squares)


def _pieces(flat: jax.Array, size: int) -> list[jax.Array]:
  """Whole chunks of ``size`` as rows, then the short last chunk as one row.

  Never padded: XLA:CPU materializes a padded copy of the input rather than
  fuse the padding into the quantizer.
  """
  n = flat.shape[0]
  whole = n - n % size
  out = [flat[:whole].reshape(-1, size)] if whole else []
  if whole < n:
    out.append(flat[whole:].reshape(1, -1))
  return out


def _code_bits(levels: int) -> int | None:
  """The packed width of the ``2 * levels + 1`` codes: 2 or 4 bits, else None."""
  for bits in (2, 4):
    if 2 * levels + 1 <= 1 << bits:
      return bits
  return None


def _level_quantizer(
  call: str,
  name: str,
  levels: int,
  bucket_size: int,
  norm: str,
  stochastic: bool,
) -> Compressor:
  """The bucketed level quantizer behind :func:`qsgd` and :func:`quantize`.

  Each bucket's level value (``scale``) is its norm over ``levels``; each
  element becomes ``sign(x) * l * scale`` with ``l`` the integer nearest
  ``|x| / scale`` (``stochastic=False``) or that quotient rounded up or down
  at random (unbiased). Levels of up to 7 travel as packed codes ``l +
  levels``, 4 bits (up to 7) or 2 bits (1) each; more as int8, int16, int32.
  """
  out_dtype = _level_dtype(levels)
  code_bits = _code_bits(levels)
  bucket_norm = _bucket_max if norm == "max" else _bucket_l2

  # Scales keep at most 24 - level_bits significant bits, so that a level
  # (level_bits bits) times a scale fits float32's 24-bit significand.
  level_bits = levels.bit_length()
  drop = min(23, level_bits)

  def scale_of(r: jax.Array) -> jax.Array:
    """``r / levels`` rounded up (towards +inf) to ``24 - level_bits`` bits."""
    bits = lax.bitcast_convert_type(r / levels, jnp.uint32)
    if level_bits >= 24:
      return r / levels
    mask = jnp.uint32((1 << drop) - 1)
    return lax.bitcast_convert_type((bits + mask) & ~mask, _F32)

  def quantize(xb: jax.Array, scale: jax.Array, bits: jax.Array | None) -> jax.Array:
    """Signed levels of one piece (rows of buckets), as float32."""
    safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    y = jnp.abs(xb).astype(_F32) / safe[:, None]
    if bits is None:
      mag = jnp.round(y)
    else:
      low = jnp.floor(y)
      mag = low + (uniform01(bits) < y - low).astype(_F32)
    mag = jnp.minimum(mag, float(levels))
    return jnp.where(xb < 0, -mag, mag)

  def encode(x, state, key):
    flat = x.reshape(-1)
    seeds = hash_seeds(key) if stochastic else None
    levels_out, scales, start = [], [], 0
    for xb in _pieces(flat, bucket_size):
      scale = scale_of(bucket_norm(xb))
      bits = None
      if seeds is not None:
        counter = lax.iota(jnp.uint32, xb.size).reshape(xb.shape) + jnp.uint32(start)
        bits = hash_bits(seeds, counter)
      levels_out.append(quantize(xb, scale, bits))
      scales.append(scale)
      start += xb.size
    if not levels_out:  # an empty leaf
      if code_bits is not None:
        return {"codes": flat.astype(jnp.uint8), "scales": flat.astype(_F32)}, state
      return {"levels": flat.astype(out_dtype), "scales": flat.astype(_F32)}, state
    # The short last bucket's levels travel apart: concatenated, XLA:CPU fuses
    # the quantizer into a concatenate, a loop it does not vectorize (about one
    # memory pass more, on 25M elements).
    if code_bits is not None:
      # Rows of packed bytes, one per bucket: flattened, XLA:CPU no longer
      # vectorizes the stochastic quantizer feeding them (ten times slower).
      sent = [
        pack_planar((lv + float(levels)).astype(jnp.uint8), code_bits)
        for lv in levels_out
      ]
    else:
      sent = [lv.astype(out_dtype).reshape(-1) for lv in levels_out]
    payload = {"levels" if code_bits is None else "codes": sent[0]}
    payload["scales"] = jnp.concatenate(scales)
    if len(sent) == 2:
      payload["tail"] = sent[1]
    return payload, state

  def decode(payload, shape, dtype, state, key):
    del state, key
    n = numel(shape)
    scales = payload["scales"]
    if code_bits is not None:
      # The first piece, "codes", is the whole buckets, or the short one alone.
      sizes = [bucket_size] if n >= bucket_size else []
      sizes += [n % bucket_size] if n % bucket_size else []
      parts = [
        unpack_planar(payload[name], code_bits, size).reshape(-1)
        for name, size in zip(("codes", "tail"), sizes, strict=False)
      ]
      lv = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
      lv = lv.astype(jnp.int32) - jnp.int32(levels)
      payload = {"scales": scales}  # the tail is in lv already
    else:
      lv = payload["levels"]
    # The levels padded to whole rows, with a short last bucket sent apart
    # written over the padding in place; the padding fuses into decoding
    # (unlike the float32 input's).
    lv = jnp.pad(lv, (0, scales.size * bucket_size - lv.size))
    if "tail" in payload:
      lv = lax.dynamic_update_slice(lv, payload["tail"], (n - payload["tail"].size,))
    lv = lv.reshape(-1, bucket_size)
    out = (lv.astype(_F32) * scales[:, None]).astype(dtype).reshape(-1)
    return out[:n].reshape(shape)

  def payload_bytes(shape, dtype):
    del dtype
    n = numel(shape)
    if code_bits is None:
      per_level = out_dtype.itemsize * n
    else:
      whole, tail = divmod(n, bucket_size)
      per_level = whole * packed_size(bucket_size, code_bits)
      per_level += packed_size(tail, code_bits)
    return per_level + 4 * (-(-n // bucket_size))

  return Compressor(
    name=name,
    init=stateless,
    encode=encode,
    decode=decode,
    payload_bytes=payload_bytes,
    summable=False,
    stochastic=stochastic,
    unbiased=stochastic,
  )


def qsgd(
  levels: int = 127,
  *,
  bucket_size: int = 128,
  norm: Literal["max", "l2"] = "max",
) -> Compressor:
  """Unbiased stochastic quantization to ``levels`` levels per bucket.

  The flat leaf is cut into buckets of ``bucket_size`` elements (the last one
  shorter). For a bucket with norm ``r``, each element becomes
  ``sign(x) * l * r / levels`` with the integer ``l`` equal to
  ``|x| / r * levels`` rounded up or down at random, so that ``E[x_hat] = x``.

  ``norm="max"`` (default) takes ``r = max |x|`` over the bucket, which puts
  the bucket's largest element on the top level and gives a smaller variance
  than the L2 norm of the paper's analysis (``norm="l2"``); on XLA:CPU its
  per-bucket reduction is also about ten times faster.

  Payload: the levels and ``scales`` (one float32 per bucket, the value of
  one level, ``r / levels`` rounded up to ``24 - bit_length(levels)``
  significant bits). Up to 7 levels travel packed as :func:`quantize`
  packs them: ``codes``, ``l + levels`` in 4 bits (2 to 7 levels, two per
  byte) or 2 bits (1 level, four per byte), ``ceil(bucket_size * bits / 8)``
  bytes per bucket (a short last bucket's apart, as ``tail``). More levels
  travel as ``levels``, ``n`` signed integers in the smallest of int8,
  int16, int32 that holds them (those of a short last bucket after whole ones
  apart, as ``tail``): ``n * itemsize`` bytes. Plus ``4 * ceil(n /
  bucket_size)`` bytes of scales. The short scale makes every decoded ``level
  * scale`` exact in float32, so all devices decode bit-identical values
  whatever XLA fuses (and a fused multiply-add in error feedback's residual
  changes nothing). Computed in float32.

  Args:
    levels: the number of levels above zero, an int >= 1 (127 fits int8, 7
      fits 4 bits, 1 fits 2 bits).
    bucket_size: the elements sharing one norm, an int >= 1.
    norm: ``"max"`` or ``"l2"``.

  Returns:
    A stochastic, unbiased :class:`Compressor` (not summable).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from clipjax import compression
    >>> F32 = jnp.float32
    >>> c = compression.qsgd(levels=4, bucket_size=2, norm="l2")
    >>> x = jnp.array([3.0, 4.0, 0.0, -2.0])
    >>> x_hat, payload, _ = c.roundtrip(x, (), jax.random.PRNGKey(0))
    >>> print(payload["scales"], payload["codes"].dtype, c.payload_bytes((4,), F32))
    [1.25 0.5 ] uint8 10
    >>> print(x_hat[3])  # -2.0 is exactly the top level of its bucket
    -2.0

  References:
    Alistarh et al., `QSGD: communication-efficient SGD via gradient quantization
    and encoding <https://arxiv.org/abs/1610.02132>`_, 2017.
  """
  call = "qsgd"
  levels = check_int(call, "levels", levels, 1)
  bucket_size = check_int(call, "bucket_size", bucket_size, 1)
  check_choice(call, "norm", norm, ("max", "l2"))
  return _level_quantizer(call, call, levels, bucket_size, norm, stochastic=True)


def quantize(
  bits: Literal[2, 4, 8] = 4,
  *,
  chunk_size: int = 64,
  rounding: Literal["nearest", "stochastic"] = "nearest",
) -> Compressor:
  """Symmetric ``bits``-bit integer quantization with a scale per chunk.

  The flat leaf is cut into chunks of ``chunk_size`` elements (the last one
  shorter). A chunk with ``r = max |x|`` and ``L = 2**(bits - 1) - 1`` levels
  (1, 7 or 127) sends, for each element, the integer ``l`` in ``[-L, L]``
  nearest ``x / scale`` (``rounding="nearest"``, deterministic: the error is
  at most ``scale / 2``) or ``x / scale`` rounded up or down at random with
  the probabilities that make ``E[x_hat] = x`` (``"stochastic"``: unbiased,
  drawn from the key as :func:`qsgd` draws). ``scale`` is ``r / L`` rounded up
  to ``24 - bit_length(L)`` significant bits, so that decoding (``l * scale``,
  exact in float32) is bit-identical on every device; the chunk's largest
  element lands on level ``L``.

  Payload: ``codes``, the codes ``l + L`` four 2-bit or two 4-bit to a byte,
  one row of ``q = ceil(chunk_size * bits / 8)`` bytes per whole chunk, byte
  ``i`` holding the chunk's codes ``i``, ``i + q``, ... from its lowest bits
  up (planar within the chunk, so that encoding reads contiguous runs, which
  XLA:CPU vectorizes), a short last chunk's row apart as ``tail`` (alone,
  as ``codes``); for
  ``bits=8``, int8 ``levels`` as :func:`qsgd` sends them. And ``scales``, one
  float32 per chunk. Bytes: ``ceil(n * bits / 8) + 4 * ceil(n / chunk_size)``
  when ``chunk_size * bits`` is a multiple of 8 (else each chunk rounds up to
  whole bytes): per element ``bits / 8 + 4 / chunk_size``, for 4 bits and
  chunks of 64 0.5625 (7.1x fewer than float32).
  The 2-bit code is ternary: ``{-1, 0, 1} * scale``, the fourth code unused,
  which keeps zero exact and the sign of every element sent.

  This is :func:`qsgd` with ``levels=L``, ``norm="max"`` and a choice of
  rounding: both run the same code. For pseudo-gradients (DiLoCo's outer
  gradients), nearest rounding with error feedback; without feedback, the
  unbiased stochastic rounding.

  Args:
    bits: 2, 4 or 8.
    chunk_size: the elements sharing one scale, an int >= 1.
    rounding: ``"nearest"`` or ``"stochastic"``.

  Returns:
    A :class:`Compressor` (not summable: scales differ between workers);
    stochastic and unbiased with ``rounding="stochastic"``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipjax import compression
    >>> c = compression.quantize(4, chunk_size=4)
    >>> x = jnp.array([3.5, -0.5, 1.2, 0.0, 7.0, 1.0])
    >>> x_hat, payload, _ = c.roundtrip(x, (), None)
    >>> print(payload["scales"])
    [0.5 1. ]
    >>> print(payload["codes"], payload["tail"])  # codes 14, 6, 9, 7 | 14, 8
    [[158 118]] [[142]]
    >>> print(x_hat, c.payload_bytes(x.shape, x.dtype))  # 1.2 is off by 0.2
    [ 3.5 -0.5  1.   0.   7.   1. ] 11

  References:
    Alistarh et al., `QSGD: communication-efficient SGD via gradient quantization
    and encoding <https://arxiv.org/abs/1610.02132>`_, 2017; Liu et al.,
    `Streaming DiLoCo with overlapping communication
    <https://arxiv.org/abs/2501.18512>`_, 2025 (4-bit outer gradients);
    Sarfi et al., `Communication efficient LLM pre-training with SparseLoCo
    <https://arxiv.org/abs/2508.15706>`_, 2025 (2-bit values).
  """
  call = "quantize"
  check_choice(call, "bits", bits, (2, 4, 8))
  chunk_size = check_int(call, "chunk_size", chunk_size, 1)
  check_choice(call, "rounding", rounding, ("nearest", "stochastic"))
  levels = (1 << (int(bits) - 1)) - 1
  stochastic = rounding == "stochastic"
  return _level_quantizer(
    call, f"int{bits}", levels, chunk_size, "max", stochastic=stochastic
  )


def terngrad() -> Compressor:
  """Unbiased ternary quantization: ``x_hat = s * sign(x) * b``, ``s = max|x|``.

  Each ``b`` is 1 with probability ``|x| / s``, else 0, so ``E[x_hat] = x``. The
  ternary codes (0 negative, 1 zero, 2 positive) travel packed 2 bits per
  element with the float32 scale: ``ceil(n / 4) + 4`` bytes. The packing is
  planar: with ``m = ceil(n / 4)``, byte ``i`` holds elements ``i``, ``i + m``,
  ``i + 2m`` and ``i + 3m`` in bits 0-1, 2-3, 4-5 and 6-7, so that encoding
  reads ``x`` as four contiguous streams. The paper's optional clipping of
  ``x`` to a few standard deviations before quantizing (biased) is left to a
  clipper.

  Returns:
    A stochastic, unbiased :class:`Compressor` (not summable).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from clipjax import compression
    >>> c = compression.terngrad()
    >>> x = jnp.array([-2.0, 0.0, 2.0, 1.0, 0.5])
    >>> x_hat, payload, _ = c.roundtrip(x, (), jax.random.PRNGKey(0))
    >>> print(payload["codes"].shape, payload["scale"], c.payload_bytes((5,), x.dtype))
    (2,) 2.0 6
    >>> print(x_hat[:3])
    [-2.  0.  2.]

  References:
    Wen et al., `TernGrad: ternary gradients to reduce communication in
    distributed deep learning <https://arxiv.org/abs/1705.07878>`_, 2017.
  """

  def encode(x, state, key):
    flat = x.reshape(-1)
    n = flat.shape[0]
    m = -(-n // 4)
    scale = jnp.max(jnp.abs(flat)).astype(_F32)
    inv = 1.0 / jnp.where(scale > 0, scale, jnp.ones_like(scale))
    seeds = hash_seeds(key)
    counter = lax.iota(jnp.uint32, m)
    packed = jnp.zeros((m,), jnp.uint8)
    for j in range(4):
      part = flat[j * m : (j + 1) * m]
      if part.shape[0] < m:  # the last quarter: zeros, which encode as zero
        part = jnp.pad(part, (0, m - part.shape[0]))
      u = uniform01(hash_bits(seeds, counter + jnp.uint32(j * m)))
      keep = u < jnp.abs(part).astype(_F32) * inv
      code = jnp.where(
        keep, jnp.where(part < 0, jnp.uint8(0), jnp.uint8(2)), jnp.uint8(1)
      )
      packed = packed | (code << jnp.uint8(2 * j))
    return {"codes": packed, "scale": scale}, state

  def decode(payload, shape, dtype, state, key):
    del state, key
    shifts = jnp.arange(0, 8, 2, dtype=jnp.uint8)[:, None]
    codes = (payload["codes"][None, :] >> shifts) & jnp.uint8(3)  # (4, m)
    s = payload["scale"]
    zero = jnp.zeros((), _F32)
    out = jnp.where(codes == 2, s, jnp.where(codes == 0, -s, zero)).astype(dtype)
    return out.reshape(-1)[: numel(shape)].reshape(shape)

  def payload_bytes(shape, dtype):
    del dtype
    return -(-numel(shape) // 4) + 4

  return Compressor(
    name="terngrad",
    init=stateless,
    encode=encode,
    decode=decode,
    payload_bytes=payload_bytes,
    summable=False,
    stochastic=True,
    unbiased=True,
  )


def sign() -> Compressor:
  """Scaled sign: ``x_hat = mean(|x|) * sign(x)``, signs packed 1 bit each.

  Payload: ``signs`` (``ceil(n / 8)`` bytes, 8 per byte, the first element in the
  lowest bit; 1 means negative, so zeros decode as ``+mean(|x|)``) and the
  float32 ``scale``: ``ceil(n / 8) + 4`` bytes. Biased but a contraction, so
  it suits error feedback (EF-signSGD).

  Returns:
    A deterministic :class:`Compressor` (not summable).

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipjax import compression
    >>> c = compression.sign()
    >>> x = jnp.array([1.0, -3.0, 2.0, -2.0])
    >>> x_hat, payload, _ = c.roundtrip(x, (), None)
    >>> print(x_hat, payload["signs"], payload["scale"])
    [ 2. -2.  2. -2.] [10] 2.0

  References:
    Bernstein et al., `signSGD: compressed optimisation for non-convex problems
    <https://arxiv.org/abs/1802.04434>`_, 2018; Karimireddy et al., `Error
    feedback fixes SignSGD and other gradient compression schemes
    <https://arxiv.org/abs/1901.09847>`_, 2019.
  """

  def encode(x, state, key):
    del key
    flat = x.reshape(-1)
    scale = jnp.mean(jnp.abs(flat).astype(_F32))
    return {"signs": pack_bits(flat < 0), "scale": scale}, state

  def decode(payload, shape, dtype, state, key):
    del state, key
    neg = unpack_bits(payload["signs"], numel(shape))
    s = payload["scale"].astype(dtype)
    return jnp.where(neg == 1, -s, s).reshape(shape)

  def payload_bytes(shape, dtype):
    del dtype
    return -(-numel(shape) // 8) + 4

  return Compressor(
    name="sign",
    init=stateless,
    encode=encode,
    decode=decode,
    payload_bytes=payload_bytes,
    summable=False,
    stochastic=False,
    unbiased=False,
  )


def natural() -> Compressor:
  """Natural compression: unbiased stochastic rounding to a power of two.

  ``|x|`` in ``[2**e, 2**(e+1))`` becomes ``2**(e+1)`` with probability
  ``|x| / 2**e - 1``, else ``2**e`` (subnormals round to 0 or the smallest
  normal the same way), so ``E[x_hat] = x``, with variance at most ``x**2 / 8``.
  The probability is the float32 mantissa itself, compared with 23 random
  bits, so it is exact. The payload is 9 bits per element: ``exponents`` (``n``
  bytes, the float32 exponent field; 0 means zero) and ``signs`` packed 8 per
  byte: ``n + ceil(n / 8)`` bytes. Computed through float32 (float64 values
  beyond its range become 0 or infinity; NaN decodes as infinity; float16
  values above ``2**15`` may round up to ``2**16``, which is infinity there).

  Returns:
    A stochastic, unbiased :class:`Compressor` (not summable).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from clipjax import compression
    >>> c = compression.natural()
    >>> x = jnp.array([1.0, -0.25, 3.0, 0.0])
    >>> x_hat, payload, _ = c.roundtrip(x, (), jax.random.PRNGKey(0))
    >>> print(x_hat[:2], x_hat[2] in (2.0, 4.0), payload["exponents"][:2])
    [ 1.   -0.25] True [127 125]

  References:
    Horvath et al., `Natural compression for distributed deep learning
    <https://arxiv.org/abs/1905.10988>`_, 2019.
  """

  def encode(x, state, key):
    flat = x.reshape(-1).astype(_F32)
    # Read sign and magnitude from the bits: with denormals flushed, XLA:CPU
    # finds -1e-40 < 0 false, yet the mantissa below still sees it.
    bits = lax.bitcast_convert_type(flat, jnp.uint32)
    exponent = (bits >> 23) & jnp.uint32(0xFF)
    mantissa = bits & jnp.uint32(0x7FFFFF)
    up = (random_bits(key, flat.shape) >> 9) < mantissa
    code = jnp.minimum(exponent + up.astype(jnp.uint32), jnp.uint32(255))
    negative = (bits >> 31) == 1
    payload = {"exponents": code.astype(jnp.uint8), "signs": pack_bits(negative)}
    return payload, state

  def decode(payload, shape, dtype, state, key):
    del state, key
    neg = unpack_bits(payload["signs"], numel(shape)).astype(jnp.uint32)
    bits = (payload["exponents"].astype(jnp.uint32) << 23) | (neg << 31)
    return lax.bitcast_convert_type(bits, _F32).astype(dtype).reshape(shape)

  def payload_bytes(shape, dtype):
    del dtype
    n = numel(shape)
    return n + -(-n // 8)

  return Compressor(
    name="natural",
    init=stateless,
    encode=encode,
    decode=decode,
    payload_bytes=payload_bytes,
    summable=False,
    stochastic=True,
    unbiased=True,
  )


def cast(dtype: Any, *, chunk_size: int | None = None) -> Compressor:
  """Sends the leaf cast to ``dtype``, rounded to nearest; optionally scaled.

  Without ``chunk_size``, the payload is ``values`` (``n`` elements of
  ``dtype``): ``n * itemsize`` bytes. Casts to 16 bits or more are summable:
  workers' payloads can be added in ``dtype`` before decoding (mind its range
  and precision when many are summed). Float8 casts are not: a sum in float8
  (3 or 2 mantissa bits; ``float8_e4m3fn`` overflows to NaN above 448) would
  lose what the cast kept, so their payloads are gathered and each decoded.

  Float8 wants a scale. ``float8_e4m3fn``'s smallest subnormal is ``2**-9``
  (about 0.002) and its smallest normal ``2**-6``, so a raw cast sends
  pseudo-gradients of 1e-4 to 1e-2 as zeros or one significant bit.
  ``chunk_size`` gives each chunk of that many elements (the last one
  shorter; at least the leaf's size for one scale per tensor) a power of two
  ``2**e``, the smallest that brings the chunk's largest ``|x|`` to at most
  ``dtype``'s largest finite value; the chunk's elements travel as ``x /
  2**e`` cast to ``dtype`` and ``e`` travels as one byte (``exponents``,
  uint8, ``e + 127``: the float32 exponent field of the scale, ``e`` clamped
  to ``[-126, 126]``), as OCP's microscaling formats do (MXFP8: 32 elements
  share an 8-bit power-of-two scale). A power of two scales and unscales
  exactly, so each element's error is the cast's own rounding, relative to
  the chunk's largest element (``2**-4`` of ``|x|`` for e4m3fn normals,
  ``2**-3`` for e5m2, down to the subnormals' spacing times ``2**e``), and
  decoding (``value * 2**e`` in float32) is bit-identical on every device.
  Payload: ``values`` and ``exponents``, ``n * itemsize + ceil(n /
  chunk_size)`` bytes; float8 in chunks of 32 is 1.03125 bytes per element.
  Not summable: each worker's chunks have their own scales.

  Args:
    dtype: a floating-point dtype: ``jnp.float16``, ``jnp.bfloat16``,
      ``jnp.float8_e4m3fn`` (more precision) or ``jnp.float8_e5m2`` (more
      range).
    chunk_size: ``None`` (default: no scale) or the elements sharing one
      power-of-two scale, an int >= 1.

  Returns:
    A deterministic :class:`Compressor`; summable when unscaled and of 16
    bits or more.

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipjax import compression
    >>> c = compression.cast(jnp.bfloat16)
    >>> x = jnp.array([1.0, 1.00390625, 3.0])
    >>> x_hat, payload, _ = c.roundtrip(x, (), None)
    >>> print(x_hat, payload["values"].dtype, c.payload_bytes(x.shape, x.dtype))
    [1. 1. 3.] bfloat16 6

    Float8 with a scale per chunk of 32 (here one chunk):

    >>> c = compression.cast(jnp.float8_e4m3fn, chunk_size=32)
    >>> x = jnp.array([3e-3, -1e-4, 5e-4])
    >>> x_hat, payload, _ = c.roundtrip(x, (), None)
    >>> print(x_hat, payload["exponents"], c.payload_bytes(x.shape, x.dtype))
    [ 2.9296875e-03 -9.9182129e-05  4.8828125e-04] [110] 4
    >>> print(compression.cast(jnp.float8_e4m3fn).roundtrip(x, (), None)[0])
    [ 0.00390625 -0.          0.        ]

  References:
    Micikevicius et al., `Mixed precision training
    <https://arxiv.org/abs/1710.03740>`_, 2018; Rouhani et al., `Microscaling
    data formats for deep learning <https://arxiv.org/abs/2310.10537>`_, 2023.
  """
  call = "cast"
  wire = check_float_dtype(call, "dtype", dtype)
  if chunk_size is not None:
    chunk_size = check_int(call, "chunk_size", chunk_size, 1)
    return _scaled_cast(wire, chunk_size)

  def encode(x, state, key):
    del key
    return {"values": x.reshape(-1).astype(wire)}, state

  def decode(payload: Payload, shape, dtype, state, key):
    del state, key
    return payload["values"].astype(dtype).reshape(shape)

  def payload_bytes(shape, dtype):
    del dtype
    return numel(shape) * wire.itemsize

  return Compressor(
    name=f"cast_{wire.name}",
    init=stateless,
    encode=encode,
    decode=decode,
    payload_bytes=payload_bytes,
    summable=wire.itemsize >= 2,
    stochastic=False,
    unbiased=False,
  )


def _pow2(biased: jax.Array) -> jax.Array:
  """``2**(biased - 127)`` as float32, from a float32 exponent field in [1, 254]."""
  return lax.bitcast_convert_type(biased.astype(jnp.uint32) << 23, _F32)


def _scaled_cast(wire: Any, chunk_size: int) -> Compressor:
  """:func:`cast` with a power-of-two scale per chunk."""
  top_mantissa, top_exponent = math.frexp(float(jnp.finfo(wire).max))

  def exponent_of(r: jax.Array) -> jax.Array:
    """The smallest ``e`` with ``r / 2**e <= max``, in [-126, 126], as int32."""
    mantissa, exponent = jnp.frexp(r)
    e = exponent - top_exponent + (mantissa > top_mantissa).astype(jnp.int32)
    return jnp.clip(e, -126, 126)

  def encode(x, state, key):
    del key
    work = compute_dtype(x.dtype)
    values, exponents = [], []
    for xb in _pieces(x.reshape(-1), chunk_size):
      e = exponent_of(_bucket_max(xb))
      inv = _pow2(127 - e).astype(work)  # 2**-e, exact
      values.append((xb.astype(work) * inv[:, None]).astype(wire).reshape(-1))
      exponents.append((e + 127).astype(jnp.uint8))
    if not values:  # an empty leaf
      flat = x.reshape(-1)
      return {"values": flat.astype(wire), "exponents": flat.astype(jnp.uint8)}, state
    payload = {
      "values": jnp.concatenate(values),
      "exponents": jnp.concatenate(exponents),
    }
    return payload, state

  def decode(payload, shape, dtype, state, key):
    del state, key
    n = numel(shape)
    scales = _pow2(payload["exponents"])
    v = payload["values"].astype(_F32)
    v = jnp.pad(v, (0, scales.size * chunk_size - n)).reshape(-1, chunk_size)
    return (v * scales[:, None]).reshape(-1)[:n].astype(dtype).reshape(shape)

  def payload_bytes(shape, dtype):
    del dtype
    n = numel(shape)
    return n * wire.itemsize + -(-n // chunk_size)

  return Compressor(
    name=f"cast_{wire.name}_scaled",
    init=stateless,
    encode=encode,
    decode=decode,
    payload_bytes=payload_bytes,
    summable=False,
    stochastic=False,
    unbiased=False,
  )

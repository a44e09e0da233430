"""DeMo's compressor: the top-k coefficients of each chunk's cosine transform."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clipjax.compression._base import (
  Compressor,
  check_chunked_k,
  chunk_count,
  compute_dtype,
  from_top_k_of_chunks,
  numel,
  stateless,
  to_chunks,
  top_k_of_chunks,
  top_k_of_chunks_bytes,
  values_dtype_of,
)

MAX_CHUNK = 4096
"""The largest ``chunk_size`` of :func:`dct_top_k`: its matrix is
``chunk_size**2`` float32 values (64 MiB at 4096), a constant of the program."""


def dct_matrix(n: int) -> np.ndarray:
  """The orthonormal DCT-II of size ``n`` as a float64 matrix, one row a frequency.

  ``D[f, j] = s_f cos(pi (2j + 1) f / (2n))`` with ``s_0 = sqrt(1/n)`` and
  ``s_f = sqrt(2/n)``, so that ``D @ D.T`` is the identity and the inverse
  (the DCT-III) is ``D.T``. The angle's integer part ``(2j + 1) f`` is reduced
  modulo ``4n`` first, so that ``cos`` is taken of angles below ``2 pi``.

  Examples:
    >>> import numpy as np
    >>> from clipjax.compression._dct import dct_matrix
    >>> d = dct_matrix(4)
    >>> print(np.round(d[:2], 4))  # the mean, then half a cosine period
    [[ 0.5     0.5     0.5     0.5   ]
     [ 0.6533  0.2706 -0.2706 -0.6533]]
    >>> bool(np.allclose(d @ d.T, np.eye(4), atol=1e-15))
    True
  """
  j = np.arange(n)
  turns = ((2 * j + 1) * j[:, None]) % (4 * n)
  d = np.cos(np.pi * turns / (2 * n)) * np.sqrt(2.0 / n)
  d[0] = np.sqrt(1.0 / n)
  return d


def dct_top_k(
  k: int = 1, *, chunk_size: int = 128, value_dtype: Any = None
) -> Compressor:
  """Sends the ``k`` largest DCT coefficients of every chunk of ``chunk_size``.

  DeMo's compressor: the flat leaf is cut into ``c = ceil(n / chunk_size)``
  chunks (the last one padded with zeros), each chunk is taken to the
  orthonormal DCT-II basis (a product with a fixed ``chunk_size x
  chunk_size`` matrix, built in float64 by numpy and rounded to float32, at
  full precision), and each chunk sends its ``k`` coefficients of largest
  magnitude with their frequencies, exactly as :func:`chunked_top_k` sends
  its entries: in ``b = ceil(log2(chunk_size))`` bits each. Decoding puts the
  coefficients back and applies the inverse transform, the matrix's
  transpose; the padding's decoded values are dropped. Coefficients are
  computed in float32 (float64 for float64 leaves); with ``k == chunk_size``
  the round trip is the identity up to float32 rounding.

  Payload: ``values`` (``c * k`` coefficients, in ``value_dtype`` or the
  leaf's dtype, chunk by chunk, largest first) and ``indices`` (the ``c * k``
  frequencies, bit-packed as :func:`chunked_top_k` packs positions), so
  ``c * k * itemsize + ceil(c * k * b / 8)`` bytes: for float32 values and
  the defaults (1 of 128: DeMo's density, below), 0.0381 bytes per element
  (105x fewer than float32); 32 of 64 would send half, 2.375 bytes.
  A momentum concentrates in few frequencies where a gradient's entries do
  not, which is why DeMo sends cosine coefficients rather than entries.
  :func:`compose` quantizes the values too.

  The transform is 1-D, over flat chunks: a chunk of a row-major matrix is a
  run along one of its rows. DeMo's reference code instead takes a 2-D DCT
  over tiles of a matrix (``h x w``, the largest divisors of its two
  dimensions up to ``chunk_size``) and the top ``k`` of each tile's ``h w``
  coefficients (1-D chunks for vectors). Its defaults thus send 32 of 4,096
  coefficients of a matrix (0.8%), where ``dct_top_k(32, chunk_size=64)``
  would send half; that density here is the default, ``dct_top_k(1,
  chunk_size=128)``, or ``dct_top_k(8, chunk_size=1024)``. Encoding and each
  decoding cost ``chunk_size`` multiply-adds per element.

  Args:
    k: the coefficients sent per chunk, an int in ``[1, chunk_size]``.
    chunk_size: the elements of one chunk, an int in ``[2, 4096]``.
    value_dtype: the dtype the coefficients travel in (e.g. ``jnp.bfloat16``);
      ``None`` keeps the leaf's dtype.

  Returns:
    A deterministic :class:`Compressor` (not summable: each worker sends its
    own frequencies).

  Examples:
    A constant chunk is one coefficient; of ``[4, 4, 0, 0]`` the mean and the
    slowest cosine are kept, and the half period of the third is dropped:

    >>> import jax.numpy as jnp
    >>> from clipjax import compression
    >>> c = compression.dct_top_k(2, chunk_size=4)
    >>> x = jnp.array([3.0, 3.0, 3.0, 3.0, 4.0, 4.0, 0.0, 0.0])
    >>> x_hat, payload, _ = c.roundtrip(x, (), None)
    >>> print(x_hat)
    [ 3.      3.      3.      3.      4.4142  3.      1.     -0.4142]
    >>> print(payload["values"], payload["indices"])  # frequencies 0 1 0 1
    [6.     0.     4.     3.6955] [68]
    >>> c.payload_bytes(x.shape, x.dtype)  # 4 float32 values, 4 x 2 bits
    17

  References:
    Peng, Quesnelle and Kingma, `DeMo: decoupled momentum optimization
    <https://arxiv.org/abs/2411.19870>`_, 2024.
  """
  call = "dct_top_k"
  k, chunk_size = check_chunked_k(call, k, chunk_size)
  if chunk_size > MAX_CHUNK:
    raise ValueError(
      f"{call}(chunk_size={chunk_size!r}) must be at most {MAX_CHUNK}: the"
      f" transform is a chunk_size x chunk_size matrix held in the program."
    )
  values_dtype = values_dtype_of(call, value_dtype)
  basis = dct_matrix(chunk_size)

  def matrix(dtype: Any) -> jax.Array:
    return jnp.asarray(basis, compute_dtype(dtype))

  def encode(x, state, key):
    del key
    d = matrix(x.dtype)
    rows = to_chunks(x.reshape(-1).astype(d.dtype), chunk_size)
    coefs = jnp.matmul(rows, d.T, precision=lax.Precision.HIGHEST)
    return top_k_of_chunks(coefs, k, values_dtype(x.dtype)), state

  def decode(payload, shape, dtype, state, key):
    del state, key
    d = matrix(dtype)
    n = numel(shape)
    c = chunk_count(n, chunk_size)
    coefs = from_top_k_of_chunks(payload, c, k, chunk_size, d.dtype)
    rows = jnp.matmul(coefs.reshape(c, chunk_size), d, precision=lax.Precision.HIGHEST)
    return rows.reshape(-1)[:n].reshape(shape).astype(dtype)

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

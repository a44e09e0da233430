"""PowerSGD: rank-r factors from power iteration, the multi-round compressor."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clipjax.compression._base import (
  Compressor,
  Shape,
  check_int,
  numel,
  random_normal,
)

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST


def _identity(t: jax.Array) -> jax.Array:
  return t


def orthogonalize(p: jax.Array, eps: float) -> jax.Array:
  """Gram-Schmidt on the columns of ``p``: each divided by ``norm + eps``.

  A zero column stays zero (not NaN) as long as ``eps > 0``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipjax.compression._powersgd import orthogonalize
    >>> q = orthogonalize(jnp.array([[3.0, 1.0], [4.0, 1.0]]), 0.0)
    >>> print(bool(jnp.allclose(q.T @ q, jnp.eye(2), atol=1e-5)))
    True
  """
  cols: list[jax.Array] = []
  for i in range(p.shape[1]):
    c = p[:, i]
    for prev in cols:
      c = c - jnp.dot(prev, c, precision=_HIGHEST) * prev
    cols.append(c / (jnp.linalg.norm(c) + eps))
  return jnp.stack(cols, axis=1)


def matrix_shape(shape: Shape) -> tuple[int, int]:
  """The ``(shape[0], -1)`` matrix a leaf is seen as (``(1, 1)`` for a scalar)."""
  rows = shape[0] if shape else 1
  return rows, (numel(shape) // rows if rows else 0)


def powersgd(
  rank: int = 1,
  *,
  power_iterations: int = 1,
  warm_start: bool = True,
  min_compression_rate: float = 2.0,
  orthogonalization_eps: float = 1e-8,
) -> Compressor:
  """Low-rank compression by power iteration, each leaf a ``(shape[0], -1)`` matrix.

  For the ``n x m`` matrix ``M`` of a leaf, one power iteration computes
  ``P = M Q``, orthonormalizes ``P``'s columns (Gram-Schmidt), then
  ``Q = M^T P``; the estimate is ``P Q^T``, of rank ``rank`` at most. A matrix
  of rank ``<= rank`` comes back exactly (to float32 rounding) after one
  iteration. Across workers, ``P`` and ``Q`` are each averaged before use
  (:attr:`Compressor.reduce`), so the exchange is two summable rounds per
  iteration. Factors are float32 and computed with full-precision matmuls.

  A leaf goes uncompressed (its payload the leaf itself) when its matrix is
  smaller than ``rank`` in either direction or when its dense bytes are less
  than ``min_compression_rate`` times the factors' bytes,
  ``power_iterations * (n + m) * rank * 4``: biases, norms' scales and small
  matrices. Flax's convolution kernels (HWIO) become ``(H, W * I * O)``
  matrices.

  The state of a compressed leaf is ``Q`` (``m x rank``, float32), started
  from a fixed seed so that every worker holds the same. With ``warm_start``,
  each step starts from the previous step's ``Q`` (one iteration per step then
  suffices); otherwise ``Q`` is drawn from the step's key. A ``Q`` that has
  become all zero (after an all-zero gradient) is redrawn from the key.

  Payload of a compressed leaf: ``p`` (``power_iterations x n x rank``) and ``q``
  (``power_iterations x m x rank``), the factors of every round, float32.

  Args:
    rank: the rank of the estimate, an int >= 1.
    power_iterations: iterations per step, an int >= 1.
    warm_start: reuse the previous ``Q``.
    min_compression_rate: leaves that would shrink less than this go dense.
    orthogonalization_eps: added to each column's norm before dividing; keep it
      positive so that an all-zero gradient gives zeros, not NaN.

  Returns:
    A summable :class:`Compressor` with a ``reduce`` for the multi-worker
    exchange. It is biased: use it with error feedback, as the paper does.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from clipjax import compression
    >>> c = compression.powersgd(rank=1)
    >>> x = jnp.outer(jnp.arange(1.0, 9.0), jnp.linspace(-1.0, 1.0, 6))  # rank 1
    >>> state = c.init(x.shape, x.dtype)
    >>> x_hat, payload, state = c.roundtrip(x, state, jax.random.PRNGKey(0))
    >>> print(bool(jnp.allclose(x_hat, x, atol=1e-5)), payload["p"].shape, state.shape)
    True (1, 8, 1) (6, 1)
    >>> c.payload_bytes(x.shape, x.dtype), c.payload_bytes((3,), jnp.float32)
    (56, 12)

  References:
    Vogels, Karimireddy and Jaggi, `PowerSGD: practical low-rank gradient
    compression for distributed optimization
    <https://arxiv.org/abs/1905.13727>`_, 2019.
  """
  call = "powersgd"
  rank = check_int(call, "rank", rank, 1)
  power_iterations = check_int(call, "power_iterations", power_iterations, 1)
  for name, value, positive in (
    ("min_compression_rate", min_compression_rate, True),
    ("orthogonalization_eps", orthogonalization_eps, False),
  ):
    ok = isinstance(value, int | float | np.floating | np.integer) and not isinstance(
      value, bool
    )
    if not ok or not np.isfinite(value) or (value <= 0 if positive else value < 0):
      kind = "positive" if positive else "non-negative"
      raise ValueError(f"{call}({name}={value!r}) must be a finite {kind} number.")
  eps = float(orthogonalization_eps)

  def factor_bytes(shape: Shape) -> int:
    n, m = matrix_shape(shape)
    return power_iterations * (n + m) * rank * 4

  def compressed(shape: Shape, dtype: Any) -> bool:
    n, m = matrix_shape(shape)
    if rank > min(n, m):
      return False
    dense = n * m * jnp.dtype(dtype).itemsize
    return dense >= min_compression_rate * factor_bytes(shape)

  def init(shape, dtype):
    if not compressed(shape, dtype) or not warm_start:
      return ()
    _, m = matrix_shape(shape)
    return jax.random.normal(jax.random.PRNGKey(0), (m, rank), _F32)

  def start(state: Any, key: jax.Array, m: int) -> jax.Array:
    fresh = random_normal(key, (m, rank))
    if not warm_start:
      return fresh
    return jnp.where(jnp.any(state != 0), state, fresh)

  def exchange(x, state, key, mean_fn: Callable[[jax.Array], jax.Array]):
    """All rounds; returns (mean_hat, local_hat, new_state, ps, qs)."""
    n, m = matrix_shape(x.shape)
    mat = x.astype(_F32).reshape(n, m)
    q = start(state, key, m)
    ps, qs = [], []
    for _ in range(power_iterations):
      p = orthogonalize(mean_fn(jnp.matmul(mat, q, precision=_HIGHEST)), eps)
      q_local = jnp.matmul(mat.T, p, precision=_HIGHEST)
      q = mean_fn(q_local)
      ps.append(p)
      qs.append(q_local)

    def rebuild(qq):
      out = jnp.matmul(p, qq.T, precision=_HIGHEST)
      return out.astype(x.dtype).reshape(x.shape)

    new_state = q if warm_start else ()
    return rebuild(q), rebuild(qs[-1]), new_state, ps, qs

  def encode(x, state, key):
    if not compressed(x.shape, x.dtype):
      return {"values": x}, state
    _, _, state, ps, qs = exchange(x, state, key, _identity)
    return {"p": jnp.stack(ps), "q": jnp.stack(qs)}, state

  def decode(payload, shape, dtype, state, key):
    del state, key
    if "values" in payload:
      return payload["values"].astype(dtype).reshape(shape)
    out = jnp.matmul(payload["p"][-1], payload["q"][-1].T, precision=_HIGHEST)
    return out.astype(dtype).reshape(shape)

  def reduce(x, state, key, mean_fn):
    if not compressed(x.shape, x.dtype):
      return mean_fn(x), x, state
    mean_hat, local_hat, state, _, _ = exchange(x, state, key, mean_fn)
    return mean_hat, local_hat, state

  def payload_bytes(shape, dtype):
    if compressed(shape, dtype):
      return factor_bytes(shape)
    return numel(shape) * jnp.dtype(dtype).itemsize

  return Compressor(
    name=call,
    init=init,
    encode=encode,
    decode=decode,
    payload_bytes=payload_bytes,
    summable=True,
    stochastic=True,
    unbiased=False,
    reduce=reduce,
  )

"""Compressed data-parallel gradient exchange over a JAX device mesh.

:func:`compressed_mean` runs inside ``jax.shard_map`` over a mesh's data axis.
Each device compresses its own gradient (with its own error-feedback state),
the payloads travel by the collective that suits the compressor, and every
device ends with the same decoded mean:

- ``"psum"`` for payloads that add up before decoding (casts, shared-seed
  random-k; PowerSGD's factors, averaged between its rounds by ``pmean``): a
  ring all-reduce sends ``2 (N-1)/N`` payloads per device;
- ``"all_gather"`` for the others (top-k, quantizers, sign): every device gets
  every payload and decodes each; ``N-1`` payloads per device;
- ``"reduce_scatter"``: each device cuts its vector into ``N`` chunks,
  compresses them, and an ``all_to_all`` hands chunk ``j`` of every device to
  device ``j``, which decodes and averages them, compresses that mean chunk
  again and ``all_gather``\\ s it: ``2 (N-1)/N`` full payloads per device, a
  factor ``N/2`` fewer bytes than ``"all_gather"``, for a second compression
  of the mean (not fed back).

The exchange is JAX's own collectives over the mesh, so the same code runs on
the devices of one process and across processes started with
``jax.distributed.initialize``.

When compression pays: a dense float32 ring all-reduce sends ``2 (N-1)/N D``
bytes per device for a gradient of ``D`` bytes. A summable payload of ``P``
bytes costs ``2 (N-1)/N P``, a saving of ``D / P`` at any ``N``. A gathered
payload costs ``(N-1) P``: sparse top-k with int32 indices (``P = 2 k 4``
bytes) beats the dense all-reduce only while its density ``k / n`` stays below
about ``1 / N``, and the saving shrinks as ``N`` grows.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from clipjax.compression import _transform, cast
from clipjax.compression._base import Compressor, check_choice, wire
from clipjax.compression._feedback import FEEDBACKS

try:  # public in later JAX releases, private (and stable) in 0.7-0.10
  _all_gather_invariant = jax.lax.all_gather_invariant  # type: ignore[attr-defined]
except AttributeError:
  from jax._src.lax.parallel import all_gather_invariant as _all_gather_invariant

__all__ = ("EXCHANGES", "compressed_mean", "exchange_bytes")

EXCHANGES = ("auto", "psum", "all_gather", "reduce_scatter")
_DENSE = cast(jnp.float32)  # the uncompressed float32 exchange, for its bytes


def exchange_bytes(
  compressor: Compressor, shape: tuple[int, ...], dtype: Any, n: int, exchange: str
) -> int:
  """Bytes one device sends (and receives) per step for one leaf.

  Ring collectives: an all-reduce of ``P`` bytes moves ``2 (N-1)/N P``, an
  all-gather of ``P`` bytes per device ``(N-1) P``, an all-to-all of ``P``
  ``(N-1)/N P``; rounded to whole bytes.

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipjax import compression, distributed
    >>> c = compression.top_k(0.01)
    >>> c.payload_bytes((10_000,), jnp.float32)
    800
    >>> distributed.exchange_bytes(c, (10_000,), jnp.float32, 8, "all_gather")
    5600
    >>> dense = compression.cast(jnp.float32)
    >>> distributed.exchange_bytes(dense, (10_000,), jnp.float32, 8, "psum")
    70000
  """
  if n <= 1:
    return 0
  if exchange == "reduce_scatter":
    chunk = (math.prod(shape) + n - 1) // n
    return 2 * (n - 1) * compressor.payload_bytes((chunk,), dtype)
  p = compressor.payload_bytes(shape, dtype)
  if exchange == "psum":
    return (2 * (n - 1) * p + n - 1) // n
  return (n - 1) * p


def _resolve(call: str, compressor: Compressor, exchange: str) -> str:
  check_choice(call, "exchange", exchange, EXCHANGES)
  if exchange == "auto":
    return "psum" if compressor.summable or compressor.reduce else "all_gather"
  if exchange == "psum" and not (compressor.summable or compressor.reduce):
    raise ValueError(
      f"{call}(exchange='psum'): {compressor.name!r} payloads cannot be summed"
      " before decoding (its decode is not linear in the payload); use"
      " exchange='all_gather' or 'reduce_scatter'."
    )
  if exchange != "psum" and compressor.reduce is not None:
    raise ValueError(
      f"{call}(exchange={exchange!r}): {compressor.name!r} runs its own rounds of"
      " averaging; use exchange='psum' or 'auto'."
    )
  return exchange


def _axis_size(call: str, axis_name: Any) -> int:
  try:
    return lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(
      f"{call}(axis_name={axis_name!r}): no mesh axis of that name is bound here;"
      " call the update inside jax.shard_map over a mesh with that axis name."
    ) from e


def _leaf_exchange(
  compressor: Compressor, axis_name: Any, exchange: str
) -> Callable[..., tuple[jax.Array, jax.Array, Any, int]]:
  """``(x, cstate, key) -> (local_hat, mean_hat, cstate, bytes)`` for one leaf."""

  def pmean(t: jax.Array) -> jax.Array:
    return lax.pmean(t, axis_name)

  def run(x: jax.Array, cs: Any, key: jax.Array) -> tuple[Any, ...]:
    n = lax.axis_size(axis_name)
    sent = exchange_bytes(compressor, x.shape, x.dtype, n, exchange)
    if compressor.stochastic and not compressor.summable:
      # Independent draws per worker, so that their errors average out.
      key = jax.random.fold_in(key, lax.axis_index(axis_name))
    if compressor.reduce is not None:
      mean_hat, local_hat, cs = compressor.reduce(x, cs, key, pmean)
      return local_hat, mean_hat, cs, sent
    if exchange == "reduce_scatter":
      local_hat, mean_hat = _reduce_scatter(compressor, axis_name, x, cs, key, n)
      return local_hat, mean_hat, cs, sent
    payload, cs = compressor.encode(x, cs, key)
    payload = wire(payload)
    local_hat = compressor.decode(payload, x.shape, x.dtype, cs, key)
    if exchange == "psum":
      mean_hat = compressor.decode(
        jax.tree.map(pmean, payload), x.shape, x.dtype, cs, key
      )
      return local_hat, mean_hat, cs, sent
    gathered = _gather(payload, axis_name)
    keys = _worker_keys(compressor, key, axis_name, n)
    decoded = jax.vmap(
      lambda p, k: compressor.decode(p, x.shape, x.dtype, cs, k).astype(_acc(x.dtype))
    )(gathered, keys)
    return local_hat, jnp.mean(decoded, axis=0).astype(x.dtype), cs, sent

  return run


def _gather(x: Any, axis_name: Any) -> Any:
  """``all_gather`` whose result is typed as the same on every device.

  Every device receives the same arrays, so anything decoded from them may be
  returned with ``out_specs=P()`` under ``shard_map``'s replication check;
  plain ``all_gather`` would type it as varying.
  """
  return jax.tree.map(lambda p: _all_gather_invariant(p, axis_name), x)


def _acc(dtype: Any) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def _worker_keys(
  compressor: Compressor, key: jax.Array, axis_name: Any, n: int
) -> jax.Array:
  """The key each worker encoded with (they differ for stochastic compressors)."""
  if compressor.stochastic and not compressor.summable:
    return _gather(key, axis_name)
  return jnp.broadcast_to(key, (n, *key.shape))


def _reduce_scatter(
  compressor: Compressor,
  axis_name: Any,
  x: jax.Array,
  cs: Any,
  key: jax.Array,
  n: int,
) -> tuple[jax.Array, jax.Array]:
  """Chunk, all_to_all, decode and average a chunk, compress it, all_gather."""
  size = x.size
  chunk = (size + n - 1) // n
  flat = jnp.pad(x.reshape(-1), (0, chunk * n - size)).reshape(n, chunk)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))

  def encode(v: jax.Array, k: jax.Array) -> Any:
    return compressor.encode(v, cs, k)[0]

  def decode(p: Any, k: jax.Array) -> jax.Array:
    return compressor.decode(p, (chunk,), x.dtype, cs, k)

  payloads = wire(jax.vmap(encode)(flat, keys))
  local_hat = jax.vmap(decode)(payloads, keys).reshape(-1)[:size].reshape(x.shape)
  # Device j receives every device's chunk j, encoded with that device's key j.
  received = jax.tree.map(
    lambda p: lax.all_to_all(p, axis_name, 0, 0, tiled=False), payloads
  )
  me = lax.axis_index(axis_name)
  their_keys = lax.all_to_all(keys, axis_name, 0, 0, tiled=False)
  decoded = jax.vmap(decode)(received, their_keys).astype(_acc(x.dtype))
  mean_chunk = jnp.mean(decoded, axis=0).astype(x.dtype)
  second_key = jax.random.fold_in(jax.random.fold_in(key, n), me)
  second = wire(compressor.encode(mean_chunk, cs, second_key)[0])
  gathered = _gather(second, axis_name)
  gathered_keys = _gather(second_key, axis_name)
  chunks = jax.vmap(decode)(gathered, gathered_keys)
  mean_hat = chunks.reshape(-1)[:size].reshape(x.shape)
  return local_hat, mean_hat


def compressed_mean(
  compressor: Compressor,
  axis_name: Any,
  *,
  feedback: str | None = "error_feedback",
  key: Any = None,
  exchange: str = "auto",
) -> optax.GradientTransformation:
  """The mean over a mesh axis of every device's compressed gradient.

  Use inside ``jax.shard_map`` (or ``pmap``) over the data axis, in place of
  ``jax.lax.pmean(grads, axis_name)``: each device compresses its local
  gradient with its own feedback state, the payloads travel by the exchange
  below, and every device gets the same decoded mean, which is the update.
  With a lossless compressor (``cast(jnp.float32)``) it equals ``pmean``.

  The state holds per-device parts (error-feedback residuals differ between
  devices), so keep it per device: e.g. with a leading device axis outside
  ``shard_map`` (``P(axis_name)``) and that axis indexed away inside. The key
  must be the same on every device; stochastic quantizers fold in the device
  index so that their draws are independent.

  Args:
    compressor: a :class:`~clipjax.compression.Compressor`.
    axis_name: the mesh axis to average over.
    feedback: ``"error_feedback"`` (default), ``"ef21"`` or ``None``, as in
      :func:`~clipjax.compression.compress`.
    key: the base PRNG key (``None`` is seed 0), the same on every device.
    exchange: ``"auto"`` (``"psum"`` for summable payloads and PowerSGD,
      ``"all_gather"`` otherwise), ``"psum"``, ``"all_gather"`` or
      ``"reduce_scatter"`` (see the module docstring).

  Returns:
    An ``optax.GradientTransformation``; its ``stats`` (read with
    :func:`clipjax.compression.compression_stats`) count the bytes one device
    sends and receives per step, against a dense float32 ring all-reduce.

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np, optax
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> from clipjax import compression, distributed
    >>> mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    >>> tx = distributed.compressed_mean(compression.top_k(0.25), "data")
    >>> @jax.jit
    ... @jax.shard_map(mesh=mesh, in_specs=P("data"), out_specs=(P(), P()))
    ... def mean_of_rows(g):
    ...   g = g[0]  # this device's gradient
    ...   update, state = tx.update(g, tx.init(g))
    ...   stats = compression.compression_stats(state)
    ...   return update, stats["top_k/bytes_sent"]
    >>> grads = jnp.arange(32.0).reshape(8, 4)  # device i holds row i
    >>> update, sent = mean_of_rows(grads)
    >>> print(update, sent)  # each device kept its largest element
    [ 0.  0.  0. 17.] 56.0

  References:
    Vogels et al., `PowerSGD: practical low-rank gradient compression for
    distributed optimization <https://arxiv.org/abs/1905.13727>`_, 2019;
    Lin et al., `Deep gradient compression <https://arxiv.org/abs/1712.01887>`_,
    2018.
  """
  call = "compressed_mean"
  if not isinstance(compressor, Compressor):
    raise TypeError(f"{call}(compressor={compressor!r}) must be a Compressor.")
  exchange = _resolve(call, compressor, exchange)
  check_choice(call, "feedback", feedback, tuple(FEEDBACKS))
  return _transform.staged_transform(
    call,
    compressor.name,
    [compressor],
    None,
    FEEDBACKS[feedback](),
    key,
    exchange=_leaf_exchange(compressor, axis_name, exchange),
    dense_bytes=lambda leaves: sum(
      exchange_bytes(_DENSE, x.shape, jnp.float32, lax.axis_size(axis_name), "psum")
      for x in leaves
    ),
    check=lambda: _axis_size(call, axis_name),
  )

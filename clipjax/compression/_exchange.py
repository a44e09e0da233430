"""Collective exchanges of compressed payloads over a mesh axis (the transport).

Used by ``clipjax.distributed.compressed_mean`` and ``dgc(axis_name=...)``;
see ``clipjax.distributed`` for the exchanges and their bytes.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from clipjax import _norms
from clipjax.compression._base import Compressor, check_choice, compute_dtype, wire
from clipjax.compression._compressors import cast

try:  # public in later JAX releases, private (and stable) in 0.7-0.10
  _all_gather_invariant = jax.lax.all_gather_invariant  # type: ignore[attr-defined]
except AttributeError:
  from jax._src.lax.parallel import all_gather_invariant as _all_gather_invariant

EXCHANGES = ("auto", "psum", "all_gather", "reduce_scatter")
"""The transports ``compressed_mean(exchange=...)`` accepts, the default first."""
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


def resolve(call: str, compressor: Compressor, exchange: str) -> str:
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


def axis_size(call: str, axis_name: Any) -> int:
  try:
    return lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(
      f"{call}(axis_name={axis_name!r}): no mesh axis of that name is bound here;"
      " call the update inside jax.shard_map over a mesh with that axis name."
    ) from e


def check_local(call: str, axis_name: Any) -> Callable[[Any], None]:
  """``check(updates)``: the axis is bound here and every leaf is a local gradient.

  A leaf that is the same on every device along ``axis_name`` (as
  ``jax.typeof`` records inside ``shard_map``) is a gradient that ``jax.grad``
  has already summed over the devices; exchanging it would average ``N``
  copies of a dense all-reduce, so it is an error. Where JAX records nothing
  (``pmap``, ``shard_map(check_vma=False)``), nothing can be checked.
  """

  def check(updates: Any) -> None:
    axis_size(call, axis_name)
    if not _norms.tracks_varying(axis_name):
      return
    axes = _norms.mesh_axes(axis_name)
    for path, x in jax.tree_util.tree_flatten_with_path(updates)[0]:
      if not set(axes) <= _norms.varying_axes(x):
        where = f"the gradient leaf {jax.tree_util.keystr(path) or '(the update)'}"
        raise _norms.already_summed(call, where, axis_name)

  return check


def leaf_exchange(compressor: Compressor, axis_name: Any, exchange: str) -> Any:
  """The transport of the leaves over ``axis_name`` (a ``Transport``).

  For ``"psum"`` and ``"all_gather"`` it runs in three steps: ``local`` encodes
  (and decodes) one leaf, ``collective`` moves the payloads of *every* leaf at
  once, one collective per payload dtype (the arrays of a dtype concatenated
  into one buffer: a collective costs a rendezvous of all devices, whatever
  its size), and ``mean`` decodes one leaf's received payloads into the mean.
  PowerSGD's rounds and the reduce-scatter exchange run per leaf (``run``).
  ``nbytes(shape, dtype)`` counts the bytes one device sends for a leaf.
  """
  from clipjax.compression._transform import Transport

  def pmean(t: jax.Array) -> jax.Array:
    return lax.pmean(t, axis_name)

  def nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return exchange_bytes(compressor, shape, dtype, lax.axis_size(axis_name), exchange)

  per_worker = compressor.stochastic and not compressor.summable

  def worker_key(key: jax.Array) -> jax.Array:
    if per_worker:
      # Independent draws per worker, so that their errors average out.
      return jax.random.fold_in(key, lax.axis_index(axis_name))
    return key

  def run(x: jax.Array, cs: Any, key: jax.Array) -> tuple[Any, ...]:
    n = lax.axis_size(axis_name)
    key = worker_key(key)
    if compressor.reduce is not None:
      mean_hat, local_hat, cs = compressor.reduce(x, cs, key, pmean)
      return local_hat, mean_hat, cs
    local_hat, mean_hat = _reduce_scatter(compressor, axis_name, x, cs, key, n)
    return local_hat, mean_hat, cs

  if compressor.reduce is not None or exchange == "reduce_scatter":
    return Transport(nbytes, run=run)

  def local(x: jax.Array, cs: Any, key: jax.Array) -> tuple[Any, ...]:
    key = worker_key(key)
    payload, cs = compressor.encode(x, cs, key)
    payload = wire(payload)
    local_hat = compressor.decode(payload, x.shape, x.dtype, cs, key)
    if per_worker and exchange != "psum":
      payload = {**payload, "_key": key}  # the receivers decode with it
    return payload, local_hat, cs

  def collective(payloads: list[Any]) -> list[Any]:
    if exchange == "psum":
      return _batched(payloads, pmean, gathered=False)
    return _batched(payloads, lambda t: _all_gather_invariant(t, axis_name))

  def mean(received: Any, x: jax.Array, cs: Any, key: jax.Array) -> jax.Array:
    if exchange == "psum":
      return compressor.decode(received, x.shape, x.dtype, cs, key)
    if per_worker:
      keys = received["_key"]
      received = {k: v for k, v in received.items() if k != "_key"}
    else:
      n = lax.axis_size(axis_name)
      keys = jnp.broadcast_to(key, (n, *key.shape))
    decoded = jax.vmap(
      lambda p, k: compressor.decode(p, x.shape, x.dtype, cs, k).astype(
        compute_dtype(x.dtype)
      )
    )(received, keys)
    return jnp.mean(decoded, axis=0).astype(x.dtype)

  return Transport(nbytes, local=local, collective=collective, mean=mean)


def _batched(
  trees: list[Any], collective: Callable[[jax.Array], jax.Array], gathered: bool = True
) -> list[Any]:
  """``collective`` of every array of ``trees``, one call per dtype.

  The arrays of one dtype are flattened into one buffer; with ``gathered``
  the collective adds a leading worker axis (all-gather), which each array
  gets back after its group axis: ``(group, worker, ...)``.
  """
  leaves, treedef = jax.tree.flatten(trees)
  by_dtype: dict[Any, list[int]] = {}
  for i, a in enumerate(leaves):
    by_dtype.setdefault(jnp.dtype(a.dtype), []).append(i)
  out: list[Any] = list(leaves)
  for idx in by_dtype.values():
    flat = jnp.concatenate([leaves[i].reshape(-1) for i in idx])
    moved = collective(flat)
    offset = 0
    for i in idx:
      a = leaves[i]
      size = a.size
      part = moved[..., offset : offset + size]
      offset += size
      if gathered:
        part = jnp.moveaxis(part.reshape(part.shape[0], *a.shape), 0, 1)
      else:
        part = part.reshape(a.shape)
      out[i] = part
  return jax.tree.unflatten(treedef, out)


def _gather(x: Any, axis_name: Any) -> Any:
  """``all_gather`` whose result is typed as the same on every device.

  Every device receives the same arrays, so anything decoded from them may be
  returned with ``out_specs=P()`` under ``shard_map``'s replication check;
  plain ``all_gather`` would type it as varying.
  """
  return jax.tree.map(lambda p: _all_gather_invariant(p, axis_name), x)


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
  decoded = jax.vmap(decode)(received, their_keys).astype(compute_dtype(x.dtype))
  mean_chunk = jnp.mean(decoded, axis=0).astype(x.dtype)
  second_key = jax.random.fold_in(jax.random.fold_in(key, n), me)
  second = wire(compressor.encode(mean_chunk, cs, second_key)[0])
  gathered = _gather(second, axis_name)
  gathered_keys = _gather(second_key, axis_name)
  chunks = jax.vmap(decode)(gathered, gathered_keys)
  mean_hat = chunks.reshape(-1)[:size].reshape(x.shape)
  return local_hat, mean_hat


def dense_bytes(axis_name: Any) -> Callable[[list[jax.Array]], int]:
  """The bytes a dense float32 ring all-reduce of the leaves moves per device."""

  def count(leaves: list[jax.Array]) -> int:
    n = lax.axis_size(axis_name)
    return sum(exchange_bytes(_DENSE, x.shape, jnp.float32, n, "psum") for x in leaves)

  return count


def all_finite(axis_name: Any) -> Callable[[jax.Array], jax.Array]:
  """``finite`` on every device: a step is skipped everywhere or nowhere."""

  def agree(finite: jax.Array) -> jax.Array:
    return lax.pmin(finite.astype(jnp.int32), axis_name) > 0

  return agree

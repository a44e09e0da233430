"""Compressed data-parallel gradient exchange over a JAX device mesh, and DiLoCo.

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
  device ``j``, which decodes and averages them and compresses that mean chunk
  again, and an ``all_gather`` hands it to every device: ``2 (N-1)/N`` full
  payloads per device, a factor ``N/2`` fewer bytes than ``"all_gather"``, for
  a second compression of the mean (not fed back).

The exchange is JAX's own collectives over the mesh, so the same code runs on
the devices of one process and across processes started with
``jax.distributed.initialize``.

When compression pays: a dense float32 ring all-reduce sends ``2 (N-1)/N D``
bytes per device for a gradient of ``D`` bytes. A summable payload of ``P``
bytes costs ``2 (N-1)/N P``, a saving of ``D / P`` at any ``N``. A gathered
payload costs ``(N-1) P``: sparse top-k with int32 indices (``P = 2 k 4``
bytes) beats the dense all-reduce only while its density ``k / n`` stays below
about ``1 / N``, and the saving shrinks as ``N`` grows.

:func:`diloco` sends far less: each device takes ``sync_every`` local steps
with an inner optimizer, and only then is the pseudo-gradient (the anchor
minus the local params) averaged, through the same exchange with a
compressor or by a plain ``pmean``, and applied by an outer optimizer; with
``fragments`` (Streaming DiLoCo) one fragment of the leaves travels at a time.

:func:`demo` is DeMo, a whole optimizer made of the same parts: each device
keeps a decaying momentum as its error-feedback residual, sends the top DCT
coefficients of each chunk of it, and steps by the sign of the gathered mean.
"""

from typing import Any

import optax

from clipjax._checks import check_bound, is_concrete
from clipjax._diloco import DilocoState, DilocoStats, diloco, diloco_stats
from clipjax.compression import _exchange, _transform
from clipjax.compression._base import Compressor, check_chunked_k, check_unit
from clipjax.compression._dct import dct_top_k
from clipjax.compression._exchange import EXCHANGES, exchange_bytes
from clipjax.compression._feedback import Feedback, error_feedback, resolve_feedback

__all__ = (
  "EXCHANGES",
  "DilocoState",
  "DilocoStats",
  "compressed_mean",
  "demo",
  "diloco",
  "diloco_stats",
  "exchange_bytes",
)


def compressed_mean(
  compressor: Compressor,
  axis_name: Any,
  *,
  feedback: str | Feedback | None = "error_feedback",
  key: Any = None,
  exchange: str = "auto",
) -> optax.GradientTransformation:
  """The mean over a mesh axis of every device's compressed gradient.

  Use inside ``jax.shard_map`` (or ``pmap``) over the data axis, in place of
  ``jax.lax.pmean(grads, axis_name)``: each device compresses its local
  gradient with its own feedback state, the payloads travel by the exchange
  below, and every device gets the same decoded mean, which is the update.
  With a lossless compressor (``cast(jnp.float32)``) it equals ``pmean``.

  The gradient must be this device's own: ``jax.grad`` of parameters that
  enter ``shard_map`` replicated (``in_specs=P()``) returns the gradient
  already summed over the devices, so mark them per-device first
  (``jax.lax.pcast(params, axis_name, to="varying")``). A gradient leaf that
  is the same on every device (as ``jax.typeof`` records) raises
  ``ValueError``; under ``pmap`` or ``shard_map(check_vma=False)`` JAX
  records nothing and nothing is checked.

  The state holds per-device parts (error-feedback residuals differ between
  devices), so keep it per device: e.g. with a leading device axis outside
  ``shard_map`` (``P(axis_name)``) and that axis indexed away inside. The key
  must be the same on every device; stochastic quantizers fold in the device
  index so that their draws are independent. Of the statistics,
  ``residual_norm`` is per device (see
  :class:`~clipjax.compression.CompressionStats`).

  Args:
    compressor: a :class:`~clipjax.compression.Compressor`.
    axis_name: the mesh axis to average over.
    feedback: ``"error_feedback"`` (default), ``"ef21"``, ``None`` or a
      :class:`~clipjax.compression.Feedback`, as in
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
  return _mean_of(call, compressor, axis_name, feedback, key, exchange)


def _mean_of(
  call: str,
  compressor: Compressor,
  axis_name: Any,
  feedback: Any,
  key: Any,
  exchange: str,
) -> optax.GradientTransformation:
  """:func:`compressed_mean`, its errors naming ``call``."""
  exchange = _exchange.resolve(call, compressor, exchange)
  fb = resolve_feedback(call, feedback)
  return _transform.staged_transform(
    call,
    compressor.name,
    [compressor],
    None,
    fb,
    key,
    exchange=lambda c: _exchange.leaf_exchange(c, axis_name, exchange),
    dense_bytes=_exchange.dense_bytes(axis_name),
    check=_exchange.check_local(call, axis_name),
    agree=_exchange.all_finite(axis_name),
  )


def demo(
  learning_rate: optax.ScalarOrSchedule,
  *,
  axis_name: Any,
  beta: float = 0.999,
  k: int = 1,
  chunk_size: int = 128,
  weight_decay: Any = 0.0,
  value_dtype: Any = None,
) -> optax.GradientTransformation:
  """DeMo, decoupled momentum optimization, as one optimizer inside ``shard_map``.

  Each device keeps its own momentum ``m = beta * m + g`` of its own gradient,
  sends the ``k`` largest DCT coefficients of each chunk of ``m``
  (:func:`~clipjax.compression.dct_top_k`) and takes what it sent out of
  ``m``; every device averages all devices' decoded parts, and the update is
  ``-learning_rate * (sign(mean) + weight_decay * params)``. It is a chain of
  the library's parts: :func:`compressed_mean` of ``dct_top_k`` with
  ``error_feedback(decay=beta)`` (whose residual is the momentum), gathered
  (``exchange="all_gather"``), then ``optax.scale_by_sign``,
  ``optax.add_decayed_weights`` and ``optax.scale_by_learning_rate``.

  Use it as :func:`compressed_mean` is used, in place of ``pmean`` and the
  optimizer: the gradient must be this device's own (mark replicated params
  with ``jax.lax.pcast(params, axis_name, to="varying")`` before ``jax.grad``)
  and the state kept per device (the momentum differs between devices). With
  ``weight_decay`` the update needs the params. Of the statistics
  (:func:`~clipjax.compression.compression_stats`, under ``"dct_top_k/"``),
  ``bytes_sent`` counts the ring all-gather's ``(N - 1)`` payloads per device.

  Where it differs from DeMo's reference code: the transform is 1-D over flat
  chunks, where the reference tiles a matrix in 2-D, so its 32 of 64 are 32
  of a 64 x 64 tile's 4,096 coefficients: the defaults here, 1 of 128, send
  that density (0.78%; see :func:`~clipjax.compression.dct_top_k`); the
  reference scales each gradient by that step's learning rate inside the
  momentum (``m = beta * m + lr * g``), which changes nothing with a constant
  rate, as sign and top-k ignore scale; and it averages each coefficient over
  the devices that sent it, where this is the mean over all devices (the
  coefficients, then the decoded parts, so the signs can differ where
  devices chose different frequencies).

  Args:
    learning_rate: a positive number or an optax schedule.
    axis_name: the mesh axis the devices average over.
    beta: the momentum's decay, a Python number in [0, 1] (DeMo: 0.999).
    k: the DCT coefficients sent per chunk, in ``[1, chunk_size]``.
    chunk_size: the elements of one chunk, in ``[2, 4096]``.
    weight_decay: the decoupled weight decay, a non-negative number
      (``params`` scaled by ``1 - learning_rate * weight_decay`` each step).
    value_dtype: the dtype the coefficients travel in; ``None`` keeps the
      gradient's.

  Returns:
    An ``optax.GradientTransformation``: the state of the chain, whose first
    element is the exchange's :class:`~clipjax.compression.CompressState`
    (the momentum in ``feedback``).

  Examples:
    Eight devices whose gradients are constant on each chunk: one coefficient
    per chunk carries it whole, and the update is the sign of the mean times
    the learning rate, plus the weight decay.

    >>> import jax, jax.numpy as jnp, numpy as np, optax
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> from clipjax import distributed
    >>> mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    >>> tx = distributed.demo(
    ...   0.1, axis_name="data", k=1, chunk_size=4, weight_decay=0.5
    ... )
    >>> @jax.jit
    ... @jax.shard_map(mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
    ... def step(params, g):
    ...   g = g[0]  # this device's gradient
    ...   updates, _ = tx.update(g, tx.init(params), params)
    ...   return optax.apply_updates(params, updates)
    >>> device = jnp.arange(1.0, 9.0)[:, None]  # device i's gradient is (i + 1) x
    >>> grads = device * jnp.array([1.0, 1, 1, 1, -1, -1, -1, -1])
    >>> print(step(jnp.ones(8), grads))  # 1 - 0.1 (sign + 0.5)
    [0.85 0.85 0.85 0.85 1.05 1.05 1.05 1.05]

  References:
    Peng, Quesnelle and Kingma, `DeMo: decoupled momentum optimization
    <https://arxiv.org/abs/2411.19870>`_, 2024.
  """
  call = "demo"
  if not callable(learning_rate):
    check_bound(call, "learning_rate", learning_rate, positive=True)
  check_bound(call, "weight_decay", weight_decay)
  beta = check_unit(call, "beta", beta)
  k, chunk_size = check_chunked_k(call, k, chunk_size)
  compressor = dct_top_k(k, chunk_size=chunk_size, value_dtype=value_dtype)
  exchange = _mean_of(
    call, compressor, axis_name, error_feedback(decay=beta), None, "all_gather"
  )
  no_decay = is_concrete(weight_decay) and float(weight_decay) == 0.0
  return optax.chain(
    exchange,
    optax.scale_by_sign(),
    optax.identity() if no_decay else optax.add_decayed_weights(weight_decay),
    optax.scale_by_learning_rate(learning_rate),
  )

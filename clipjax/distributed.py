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
"""

from typing import Any

import optax

from clipjax._diloco import DilocoState, DilocoStats, diloco, diloco_stats
from clipjax.compression import _exchange, _transform
from clipjax.compression._base import Compressor, check_choice
from clipjax.compression._exchange import EXCHANGES, exchange_bytes
from clipjax.compression._feedback import FEEDBACKS

__all__ = (
  "EXCHANGES",
  "DilocoState",
  "DilocoStats",
  "compressed_mean",
  "diloco",
  "diloco_stats",
  "exchange_bytes",
)


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
  exchange = _exchange.resolve(call, compressor, exchange)
  check_choice(call, "feedback", feedback, tuple(FEEDBACKS))
  return _transform.staged_transform(
    call,
    compressor.name,
    [compressor],
    None,
    FEEDBACKS[feedback](),
    key,
    exchange=lambda c: _exchange.leaf_exchange(c, axis_name, exchange),
    dense_bytes=_exchange.dense_bytes(axis_name),
    check=_exchange.check_local(call, axis_name),
    agree=_exchange.all_finite(axis_name),
  )

"""Deep Gradient Compression, composed from top-k, DGC's feedback and a clipper."""

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipjax.compression import _exchange
from clipjax.compression._base import check_choice, check_int, check_ratio
from clipjax.compression._compressors import top_k
from clipjax.compression._feedback import dgc_momentum
from clipjax.compression._transform import staged_transform


def warmup_densities(ratio: float) -> list[float]:
  """DGC's densities: ``0.25, 0.25**2, ...`` while above ``ratio``, then ``ratio``.

  For ``ratio=0.001``: sparsity 75%, 93.75%, 98.4375%, 99.6%, then 99.9%.

  Examples:
    >>> from clipjax.compression._dgc import warmup_densities
    >>> warmup_densities(0.001)
    [0.25, 0.0625, 0.015625, 0.00390625, 0.001]
  """
  densities = []
  d = 0.25
  while d > ratio:
    densities.append(d)
    d *= 0.25
  return [*densities, ratio]


def dgc(
  ratio: float = 0.001,
  *,
  momentum: float = 0.9,
  clip_norm: float | None = None,
  warmup_steps: int = 0,
  selection: Literal["exact", "sampled"] = "sampled",
  key: Any = None,
  axis_name: Any = None,
) -> optax.GradientTransformation:
  """Deep Gradient Compression: top-k of momentum-corrected, accumulated gradients.

  Per leaf, with state ``u`` (momentum) and ``v`` (accumulated velocity):
  ``u = momentum * u + g``; ``v += u``; send ``top_k(v)``; keep the rest of
  ``v`` (error feedback) and zero ``u`` and ``v`` where something was sent
  (momentum factor masking). The update is the decoded sparse ``v``, which
  already carries the momentum: chain it with plain ``optax.sgd`` (no
  momentum).

  During warm-up the density falls exponentially, ``0.25, 0.25**2, ...`` down
  to ``ratio`` (sparsity 75%, 93.75%, 98.4375%, 99.6%, 99.9% for the default
  ratio), each stage lasting ``ceil(warmup_steps / stages)`` steps; each stage
  is its own static-size ``top_k`` selected by ``lax.switch`` on the step, and
  the statistics count the bytes of the stage that ran.

  With ``axis_name`` (inside ``shard_map`` over the data axis), it is the
  multi-worker DGC: each device accumulates and selects its own top-k, the
  sparse payloads are all-gathered, and the update is their decoded mean, as
  in ``clipjax.distributed.compressed_mean``.

  With ``clip_norm``, each worker first clips its own gradient by global norm
  (:func:`clipjax.clip_by_global_norm`, chained before). On one process the
  bound is ``clip_norm``; with ``axis_name`` over ``N`` devices it is the
  paper's per-worker bound ``clip_norm / sqrt(N)``, so that the sum of ``N``
  independent clipped gradients has a norm of order ``clip_norm``.

  Args:
    ratio: the final density, the fraction of entries sent, in (0, 1].
    momentum: in [0, 1).
    clip_norm: the per-worker global-norm bound, or ``None`` for no clipping.
    warmup_steps: steps of density warm-up (0: the final ratio from the start).
      The paper warms up over the first 4 epochs.
    selection: ``"sampled"`` (DGC's threshold from a random sample) or
      ``"exact"``; see :func:`top_k`.
    key: the base PRNG key for the sampled selection.
    axis_name: the mesh axis to average over, inside ``shard_map``; ``None``
      for one process.

  Returns:
    An ``optax.GradientTransformation``; its state is a :class:`CompressState`
    named ``"dgc"`` (inside ``optax.chain`` after the clipper's state when
    ``clip_norm`` is given).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from clipjax import compression
    >>> tx = compression.dgc(0.25, momentum=0.5, selection="exact")
    >>> g = {"w": jnp.array([1.0, 0.5, -0.25, 2.0])}
    >>> u, state = tx.update(g, tx.init(g))
    >>> print(u["w"])  # only the largest entry goes out
    [0. 0. 0. 2.]
    >>> u, state = tx.update(g, state)  # v = 1 + 1.5, 0.5 + 0.75, ...
    >>> print(u["w"])
    [2.5 0.  0.  0. ]
    >>> opt = optax.chain(compression.dgc(0.01, clip_norm=1.0), optax.sgd(0.1))
    >>> g = {"w": jnp.ones((1000,))}
    >>> u, _ = opt.update(g, opt.init(g))
    >>> print(int((u["w"] != 0).sum()))
    10

  References:
    Lin et al., `Deep gradient compression: reducing the communication bandwidth
    for distributed training <https://arxiv.org/abs/1712.01887>`_, 2018.
  """
  call = "dgc"
  ratio = check_ratio(call, ratio)
  if (
    not isinstance(momentum, int | float | np.floating | np.integer)
    or isinstance(momentum, bool)
    or not 0.0 <= float(momentum) < 1.0
  ):
    raise ValueError(f"{call}(momentum={momentum!r}) must be in [0, 1).")
  if clip_norm is not None and (
    not isinstance(clip_norm, int | float | np.floating | np.integer)
    or isinstance(clip_norm, bool)
    or not (0.0 < float(clip_norm) < math.inf)
  ):
    raise ValueError(
      f"{call}(clip_norm={clip_norm!r}) must be a finite positive number."
    )
  warmup_steps = check_int(call, "warmup_steps", warmup_steps, 0)
  check_choice(call, "selection", selection, ("exact", "sampled"))

  densities = warmup_densities(ratio) if warmup_steps else [ratio]
  stages = [top_k(d, selection=selection) for d in densities]
  warm = len(densities) - 1
  per_stage = math.ceil(warmup_steps / warm) if warm else 1

  def stage_of(step: jax.Array) -> jax.Array:
    return jnp.minimum(step // per_stage, warm)

  if axis_name is None:
    extra: dict[str, Any] = {}
  else:
    extra = {
      "exchange": lambda c: _exchange.leaf_exchange(c, axis_name, "all_gather"),
      "dense_bytes": _exchange.dense_bytes(axis_name),
      "check": _exchange.check_local(call, axis_name),
      "agree": _exchange.all_finite(axis_name),
    }
  core = staged_transform(
    call,
    call,
    stages,
    stage_of if warm else None,
    dgc_momentum(float(momentum)),
    key,
    **extra,
  )
  if clip_norm is None:
    return core
  import clipjax  # the public face, imported late: clipjax imports this package

  if axis_name is None:
    return optax.chain(clipjax.clip_by_global_norm(clip_norm), core)

  def clip_update(updates, state, params=None):
    n = _exchange.axis_size(call, axis_name)
    per_worker = clipjax.clip_by_global_norm(clip_norm / math.sqrt(n))
    return per_worker.update(updates, state, params)

  init = clipjax.clip_by_global_norm(clip_norm).init
  return optax.chain(optax.GradientTransformation(init, clip_update), core)

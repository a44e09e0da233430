"""Per-example clipping of explicit per-example gradients (optax's functions).

The per-example norms are computed without materialising anything beyond the
gradients themselves; an example whose norm is not finite is dropped: it adds
zero to the sum and is counted among the clipped.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from clipjax import _norms
from clipjax._checks import check_bound


class PerExampleClipInfo(NamedTuple):
  """Per-example detail of a clipped sum.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> g = {"w": jnp.array([[3.0, 4.0], [jnp.inf, 0.0]])}
    >>> _, _, info = clipjax.per_example_global_norm_clip(g, 1.0, return_info=True)
    >>> print(info.norms, info.num_nonfinite)
    [ 5. inf] 1
  """

  norms: jax.Array  # shape=(B,), float32: each example's norm before clipping
  num_nonfinite: jax.Array  # shape=(), int32: examples dropped as not finite


def _check_batch_dim(call: str, grads: Any) -> list[jax.Array]:
  leaves = [jnp.asarray(g) for g in jax.tree.leaves(grads)]
  if not leaves or any(g.ndim < 1 or g.shape[0] != leaves[0].shape[0] for g in leaves):
    raise ValueError(
      f"Unlike other transforms, `{call}` expects `grads` to have a batch"
      " dimension in the 0th axis; got shapes:"
      f" {jax.tree.map(jnp.shape, grads)}."
    )
  return leaves


def _as_float(g: jax.Array) -> jax.Array:
  return g if jnp.issubdtype(g.dtype, jnp.inexact) else g.astype(jnp.float32)


def per_example_global_norm_clip(
  grads: Any,
  l2_norm_clip: jax.typing.ArrayLike,
  *,
  return_info: bool = False,
) -> tuple[Any, jax.Array] | tuple[Any, jax.Array, PerExampleClipInfo]:
  """Sums per-example gradients, each clipped to global L2 norm ``l2_norm_clip``.

  Drop-in for ``optax.per_example_global_norm_clip``. An example whose norm is
  NaN or infinite is dropped (multiplier 0) and counted among the clipped,
  where optax would return a NaN sum. Float leaves keep their dtype (the sum
  accumulates in float32 for half precision); integer leaves give float32.

  Args:
    grads: a pytree whose leaves all have the batch on axis 0.
    l2_norm_clip: the bound on each example's norm (``inf`` disables clipping).
    return_info: also return a :class:`PerExampleClipInfo`.

  Returns:
    ``(clipped_sum, num_clipped)``, plus the info if ``return_info``.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> grads = [jnp.array([[0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]])]
    >>> clipjax.per_example_global_norm_clip(grads, 1.25)
    ([Array([1.75, 1.75, 1.75], dtype=float32)], Array(3, dtype=int32))
    >>> bad = [jnp.array([[3.0, 4.0], [jnp.nan, 0.0]])]
    >>> clipjax.per_example_global_norm_clip(bad, 1.0)
    ([Array([0.6, 0.8], dtype=float32)], Array(2, dtype=int32))

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, 2016.
  """
  call = "per_example_global_norm_clip"
  leaves = _check_batch_dim(call, grads)
  check_bound(call, "l2_norm_clip", l2_norm_clip, allow_inf=True)
  leaves = [_as_float(g) for g in leaves]
  axes = [tuple(range(1, g.ndim)) for g in leaves]
  norms = _norms.block_norms(leaves, axes, combine=True)[0]
  finite = jnp.isfinite(norms)
  multipliers = jnp.where(finite, _norms.clip_scale(norms, l2_norm_clip), 0)
  num_clipped = jnp.sum(multipliers < 1, dtype=jnp.int32)

  def clipped_sum(g):
    acc = _norms.accumulation_dtype(g.dtype)
    keep = jnp.expand_dims(finite, tuple(range(1, g.ndim)))
    kept = jnp.where(keep, g, jnp.zeros((), g.dtype)).astype(acc)
    return jnp.tensordot(multipliers.astype(acc), kept, axes=1).astype(g.dtype)

  treedef = jax.tree.structure(grads)
  summed = jax.tree.unflatten(treedef, [clipped_sum(g) for g in leaves])
  if return_info:
    info = PerExampleClipInfo(
      norms.astype(jnp.float32), jnp.sum(~finite, dtype=jnp.int32)
    )
    return summed, num_clipped, info
  return summed, num_clipped


def per_example_layer_norm_clip(
  grads: Any, global_l2_norm_clip: jax.typing.ArrayLike, uniform: bool = True
) -> tuple[Any, Any]:
  """Clips each example's gradient layer by layer, then sums over examples.

  Drop-in for ``optax.per_example_layer_norm_clip``. With ``K`` leaves and
  ``C = global_l2_norm_clip``, leaf ``i`` is clipped to ``C / sqrt(K)`` if
  ``uniform``, else to ``C * sqrt(D_i / D)`` (``D_i`` its size per example,
  ``D`` the total), so the whole example has norm at most ``C``. Non-finite
  examples are dropped per leaf, as in :func:`per_example_global_norm_clip`.

  Args:
    grads: a pytree whose leaves all have the batch on axis 0.
    global_l2_norm_clip: the overall bound ``C``.
    uniform: how ``C`` is split between leaves (see above).

  Returns:
    ``(clipped_sum, num_clipped)``: two trees shaped like ``grads``, the second
    holding each leaf's count of clipped examples.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> grads = [jnp.array([[0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]])]
    >>> clipjax.per_example_layer_norm_clip(grads, 1.25)
    ([Array([1.75, 1.75, 1.75], dtype=float32)], [Array(3, dtype=int32)])

  References:
    McMahan et al., `Learning Differentially Private Recurrent Language Models
    <https://arxiv.org/abs/1710.06963>`_, 2018.
  """
  call = "per_example_layer_norm_clip"
  leaves = _check_batch_dim(call, grads)
  check_bound(call, "global_l2_norm_clip", global_l2_norm_clip, allow_inf=True)
  if uniform:
    bounds = [global_l2_norm_clip * (1.0 / len(leaves)) ** 0.5] * len(leaves)
  else:
    total = sum(g[0].size for g in leaves)
    bounds = [global_l2_norm_clip * (g[0].size / total) ** 0.5 for g in leaves]
  results = [
    per_example_global_norm_clip(g, b) for g, b in zip(leaves, bounds, strict=True)
  ]
  treedef = jax.tree.structure(grads)
  return (
    jax.tree.unflatten(treedef, [r[0] for r in results]),
    jax.tree.unflatten(treedef, [r[1] for r in results]),
  )

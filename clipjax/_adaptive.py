"""Clippers whose bound is learned from the history of norms, and spike guards.

Each keeps its history in a ``NamedTuple`` state (checkpointable, vmappable
over an ensemble axis), with its last :class:`~clipjax.ClipStats` in a
``stats`` field so that :func:`~clipjax.clip_stats` finds it.

Non-finite gradients are a documented choice, never an accident. For every
clipper here a step whose global norm is NaN or infinite leaves the history
untouched (a single NaN never poisons it) and is counted in
``extra["nonfinite_steps"]``; the update itself follows ``nonfinite``:
``"zero"`` (default) emits zeros, ``"propagate"`` passes it through unchanged
for a later guard such as ``optax.apply_if_finite``. To skip the step for the
optimizer as well (its state left untouched), wrap the optimizer in
:func:`skip_and_clip`.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from clipjax import _norms
from clipjax._checks import (
  TreeShapes,
  check_bound,
  check_stacked_fits,
  check_state_fits,
  is_concrete,
)
from clipjax._clipping import _ONE_ARRAY, StackedStats, require_params
from clipjax._layout import Stacked
from clipjax._stats import ClipStats, make_stats, with_stats

NonFinite = Literal["zero", "propagate"]
_NONFINITE = ("zero", "propagate")


def _check_choice(call: str, name: str, value: Any, choices: tuple[str, ...]):
  if value not in choices:
    raise ValueError(f"{call}({name}={value!r}) must be one of {choices}.")


def _check_fraction(call: str, name: str, value: Any, *, closed: bool = False):
  """Raises unless ``value`` is a scalar and, when concrete, in [0, 1) ([0, 1])."""
  check_bound(call, name, value)
  if not is_concrete(value):
    return
  v = float(np.asarray(value))
  ok = 0.0 <= v <= 1.0 if closed else 0.0 <= v < 1.0
  if not ok:
    interval = "[0, 1]" if closed else "[0, 1)"
    raise ValueError(f"{call}({name}={value!r}) must be in {interval}.")


def _check_steps(call: str, name: str, value: Any, minimum: int):
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{call}({name}={value!r}) must be an int >= {minimum}.")


def _finish(updates: Any, factors: Any, nonfinite: str) -> Any:
  """Each leaf scaled by its factor; zeros or the leaf as is where it is negative.

  ``factors``: one scalar for every leaf, or a list with one per leaf, from
  :func:`_factors`: the scale factor (in ``[0, 1]``) on a finite step, -1 on
  a step to drop. Folding the step's finiteness into the factor keeps each
  leaf's kernel to a compare, a multiply and a select. ``lax.select``, not
  ``jnp.where``: this runs once per leaf, and ``jnp.where`` traces a nested
  ``jit`` each time.
  """
  leaves, treedef = jax.tree.flatten(updates)
  if not isinstance(factors, list):
    factors = [factors] * len(leaves)

  def pick(x, factor):
    y = _norms.scale_leaf(x, factor)
    bad = lax.full_like(y, 0) if nonfinite == "zero" else x
    keep = lax.ge(factor, lax.full_like(factor, 0))
    return lax.select(lax.broadcast(keep, y.shape), y, bad)

  out = [pick(x, f) for x, f in zip(leaves, factors, strict=True)]
  return jax.tree.unflatten(treedef, out)


def _factors(scales: jax.Array, finite: jax.Array) -> Any:
  """The factors :func:`_finish` takes: ``scales`` where ``finite``, else -1.

  ``scales`` is one scalar for the whole tree or a vector with one entry per
  leaf (then a list of one factor per leaf comes back). Both come out of a
  ``lax.cond`` on ``finite``, as buffers: XLA would otherwise inline the
  scalar work that decided them into every leaf's kernel (hundreds of
  instructions a leaf). A vector is read at row indices that come out of
  the same ``cond`` (``i`` when finite, 0 when not), which XLA cannot fold
  into constants: read at a constant offset (``v[i]``), an entry makes each
  leaf's kernel differ from the next and XLA:CPU compiles one per leaf
  instead of one per shape, seconds on a tree of hundreds of leaves.
  """
  rows = range(scales.shape[0]) if scales.ndim else range(0)
  kept = lambda s: (s, [np.int32(i) for i in rows])
  dropped = lambda s: (lax.full_like(s, -1), [np.int32(0) for _ in rows])
  scales, at = lax.cond(finite, kept, dropped, scales)
  if not scales.ndim:
    return scales
  # The rows are never negative: no index normalization in every leaf's kernel.
  read = lambda r: lax.dynamic_slice(scales, (r,), (1,), allow_negative_indices=False)
  return [read(r).reshape(()) for r in at]


def _leaf_norms(call: str, updates: Any) -> tuple[jax.Array, jax.Array]:
  """Each leaf's L2 norm (float32), stacked into one vector, and the global norm.

  One plain sum of squares per leaf, as fast as optax's, stacked at once (one
  concatenation); the clippers here compute everything on that vector and
  read each leaf's factor back out of it (:func:`_factors`). Overflow-safe
  as :func:`~clipjax._norms.block_norms`: if a sum overflows (one flag over
  the vector), one ``lax.cond`` recomputes the norms from squares scaled by
  a power of two, the leaves of each shape stacked into one reduction (a
  kernel per shape, not per leaf), keeping the plain norm of every leaf
  whose sum was finite.
  """
  _norms.check_float_leaves(call, updates)
  leaves = jax.tree.leaves(updates)
  if not leaves:
    return jnp.zeros((0,), jnp.float32), jnp.zeros((), jnp.float32)
  accs = [_norms.accumulation_dtype(x.dtype) for x in leaves]
  wide = _norms.widest_accumulation_dtype(leaves)
  sums = jnp.stack(
    [
      jnp.sum(_norms._squares(x, acc)).astype(wide)
      for x, acc in zip(leaves, accs, strict=True)
    ]
  )

  def plain(sums):
    # A barrier, as in block_norms: XLA would rewrite sqrt(x * x) of a
    # one-element leaf as |x|, unlike the eager result where x * x underflows.
    sums = lax.optimization_barrier(sums)
    return jnp.sqrt(sums), jnp.sqrt(jnp.sum(sums))

  def rescaled(sums):
    # Every leaf flattened and padded to whole rows of one matrix: one
    # reduction of squares scaled by 2**-k per row, one segment sum of the
    # rows into the leaves. A few kernels, however many leaves and shapes.
    matrix, ids = _padded_rows([_norms._magnitudes(x, wide) for x in leaves])
    down = _norms._down([wide])[wide]
    per_row = jnp.sum(_norms._squares(matrix, wide, down), axis=1)
    per_leaf = jax.ops.segment_sum(per_row, ids, len(leaves))
    up = np.asarray(2.0 ** _norms._shift(wide), wide)
    norms = lax.select(lax.is_finite(sums), lax.sqrt(sums), jnp.sqrt(per_leaf) * up)
    return norms, _norms.combine_norms(norms)

  overflow = jnp.isposinf(jnp.sum(sums))  # also when a single sum overflowed
  norms, total = lax.cond(overflow, rescaled, plain, sums)
  return norms.astype(jnp.float32), total.astype(jnp.float32)


# Elements per row of the matrix that the overflow paths reduce.
_ROW = 4096


def _padded_rows(arrays: Sequence[jax.Array]) -> tuple[jax.Array, np.ndarray]:
  """``arrays`` flattened, zero-padded to whole rows of ``_ROW`` and stacked.

  Returns the matrix and, for each row, the index of the array it came from:
  a reduction over the rows and a segment sum cost a few kernels whatever the
  number of arrays and shapes (the overflow paths, where compile time matters
  more than the extra pass).
  """
  rows, ids = [], []
  for i, x in enumerate(arrays):
    flat = x.reshape(-1)
    count = max(1, -(-flat.size // _ROW))
    rows.append(jnp.pad(flat, (0, count * _ROW - flat.size)).reshape(count, _ROW))
    ids.append(np.full((count,), i, np.int32))
  return jnp.concatenate(rows), np.concatenate(ids)


def _scalar_fields(tree: Any) -> StackedStats:
  """One float32 scalar per leaf of ``tree``, stacked into a single vector.

  Its :meth:`~StackedStats.wrap` gives a :class:`~clipjax.Stacked` that reads
  as a tree like ``tree`` (for a tree that is one array, that scalar).
  """
  leaves, treedef = jax.tree.flatten(tree)
  scalar: Any = jax.ShapeDtypeStruct((), jnp.float32)
  return StackedStats([scalar] * len(leaves), [None] * len(leaves), treedef)


def _wrap_vector(fields: StackedStats, vector: jax.Array) -> Any:
  """A vector of one scalar per leaf as ``fields`` reads it (see ``_scalar_fields``)."""
  return fields.wrap([vector] if fields.layout.groups else [])


def _vector(held: Any) -> jax.Array:
  """The vector of per-leaf scalars that :func:`_wrap_vector` made ``held`` of."""
  if isinstance(held, Stacked):
    return held.groups[0] if held.groups else jnp.zeros((0,), jnp.float32)
  return jnp.reshape(held, (1,))


def _global_norm(call: str, updates: Any) -> jax.Array:
  _norms.check_float_leaves(call, updates)
  return _norms.global_norm(updates).astype(jnp.float32)


def _count(finite: jax.Array) -> jax.Array:
  return finite.astype(jnp.int32)


# --- AutoClip ------------------------------------------------------------------


class AutoClipState(NamedTuple):
  """AutoClip's window of past global norms.

  Attributes:
    history: shape ``(window,)``, float32: a ring buffer of the last
      ``window`` finite global norms (zeros in the slots not yet written).
    seen: shape ``()``, int32: the finite norms recorded so far; the next one
      goes to slot ``seen % window``.
    stats: the last update's :class:`ClipStats` (zeros before the first), with
      ``extra["nonfinite_steps"]``.
    tree: the leaf paths and shapes of the tree ``init`` saw, as static
      metadata (no arrays), so that ``update`` given another tree raises
      ``ValueError`` naming the first leaf that differs.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> clipjax.autoclip(window=100).init(jnp.zeros(3)).history.shape
    (100,)
  """

  history: jax.Array  # shape=(window,), float32: a ring buffer of norms
  seen: jax.Array  # shape=(), int32: finite norms recorded so far
  stats: ClipStats
  tree: TreeShapes = TreeShapes()  # static: the tree init saw


def _percentile(history: jax.Array, n: jax.Array, q: Any) -> jax.Array:
  """``np.percentile`` (linear interpolation) of the first ``n`` entries."""
  window = history.shape[0]
  valid = jnp.arange(window, dtype=n.dtype) < n
  ordered = jnp.sort(jnp.where(valid, history, jnp.inf))
  pos = jnp.asarray(q, jnp.float32) / 100.0 * (n - 1).astype(jnp.float32)
  lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, window - 1)
  hi = jnp.clip(lo + 1, 0, jnp.maximum(n - 1, 0))
  frac = pos - lo.astype(jnp.float32)
  value = ordered[lo] + frac * (ordered[hi] - ordered[lo])
  return jnp.where(n > 0, value, jnp.inf)


def autoclip(
  percentile: jax.typing.ArrayLike = 10.0,
  *,
  window: int = 1000,
  nonfinite: NonFinite = "zero",
) -> optax.GradientTransformation:
  """Clips the global norm to a percentile of the norms seen so far (AutoClip).

  Each step records the current global norm, then clips to the ``percentile``-th
  percentile (linear interpolation, as ``np.percentile``) of the recorded norms,
  the current one included, as in the reference code. The paper keeps every
  norm; here the last ``window`` live in a ring buffer, so memory does not grow
  with the step count. The first step is never clipped (its norm is its own
  percentile), and until ``window`` norms are recorded the percentile is over
  those seen.

  Args:
    percentile: in ``[0, 100]``; the paper recommends 10.
    window: how many past norms to keep (static).
    nonfinite: the update of a step whose global norm is NaN or infinite:
      ``"zero"`` emits zeros, ``"propagate"`` passes it through unchanged (for a
      later guard such as ``optax.apply_if_finite``). Either way the history is
      left untouched and the step counted in ``extra["nonfinite_steps"]``.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`AutoClipState`.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.autoclip(50.0, window=4)
    >>> state = tx.init(jnp.zeros(1))
    >>> for g in [1.0, 3.0, 2.0, 10.0]:
    ...   u, state = tx.update(jnp.array([g]), state)
    >>> print(u, state.stats.bound)  # median of 1, 3, 2, 10
    [2.5] 2.5

  References:
    Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks <https://arxiv.org/abs/2007.14469>`_, 2020.
  """
  call = "autoclip"
  check_bound(call, "percentile", percentile)
  if is_concrete(percentile) and not 0.0 <= float(np.asarray(percentile)) <= 100.0:
    raise ValueError(f"{call}(percentile={percentile!r}) must be in [0, 100].")
  _check_steps(call, "window", window, 1)
  _check_choice(call, "nonfinite", nonfinite, _NONFINITE)

  def init_fn(params):
    return AutoClipState(
      history=jnp.zeros((window,), jnp.float32),
      seen=jnp.zeros((), jnp.int32),
      stats=_scalar_stats(call, {"nonfinite_steps": jnp.zeros((), jnp.int32)}),
      tree=TreeShapes.of(params),
    )

  def update_fn(updates, state, params=None):
    del params
    state.tree.check(call, updates)
    norm = _global_norm(call, updates)
    finite = jnp.isfinite(norm)
    slot = state.seen % window
    history = jnp.where(finite, state.history.at[slot].set(norm), state.history)
    seen = state.seen + _count(finite)
    bound = _percentile(history, jnp.minimum(seen, window), percentile)
    scale = _norms.clip_scale(norm, bound)
    extra = {"nonfinite_steps": state.stats.extra["nonfinite_steps"] + _count(~finite)}
    stats = make_stats(call, norm, scale, bound, scale < 1, extra)
    out = _finish(updates, _factors(scale, finite), nonfinite)
    return out, AutoClipState(history, seen, stats, state.tree)

  return optax.GradientTransformation(init_fn, update_fn)


def _scalar_stats(name: str, extra: dict[str, Any]) -> ClipStats:
  zero = jnp.zeros((), jnp.float32)
  return make_stats(name, zero, zero, zero, zero, extra)


# --- ZClip -----------------------------------------------------------------------


class ZClipState(NamedTuple):
  """ZClip's running mean and variance of the global norm.

  Attributes:
    seen: shape ``()``, int32: the finite norms seen so far (warm-up while
      below ``warmup_steps``).
    mean: shape ``()``, float32: the mean of the norms, exact during warm-up,
      then an EMA of the clipped norms.
    var: shape ``()``, float32: their variance, computed likewise.
    stats: the last update's :class:`ClipStats` (zeros before the first); its
      ``extra`` holds ``mean``, ``std``, ``z`` and ``nonfinite_steps``.
    tree: the leaf paths and shapes of the tree ``init`` saw, as static
      metadata (no arrays), so that ``update`` given another tree raises
      ``ValueError`` naming the first leaf that differs.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> state = clipjax.zclip().init(jnp.zeros(3))
    >>> print(state.seen, state.mean, state.var)
    0 0.0 0.0
  """

  seen: jax.Array  # shape=(), int32: finite norms seen so far
  mean: jax.Array  # shape=(), float32: mean (EMA after warm-up)
  var: jax.Array  # shape=(), float32: variance (EMA after warm-up)
  stats: ClipStats
  tree: TreeShapes = TreeShapes()  # static: the tree init saw


def zclip(
  alpha: jax.typing.ArrayLike = 0.97,
  z_thresh: jax.typing.ArrayLike = 2.5,
  warmup_steps: int = 25,
  *,
  mode: Literal["adaptive_scaling", "mean"] = "adaptive_scaling",
  max_norm: jax.typing.ArrayLike | None = None,
  eps: float = 1e-6,
  nonfinite: NonFinite = "zero",
) -> optax.GradientTransformation:
  """Clips global-norm spikes detected by a z-score over an EMA (ZClip).

  During the first ``warmup_steps`` finite steps the norms' mean and variance
  are accumulated exactly (and only ``max_norm`` clips). Afterwards, with
  ``mu``, ``sigma`` the EMA mean and standard deviation, the z-score is
  ``z = (||g|| - mu) / (sigma + eps)``; if ``z > z_thresh`` the update is
  clipped to ``mu + z_thresh**2 * sigma / z`` (mode ``"adaptive_scaling"``:
  the stronger the outlier, the lower the bound) or to ``mu`` (mode
  ``"mean"``). The EMA is then updated with the clipped norm:
  ``mu <- alpha * mu + (1 - alpha) * n``, ``var <- alpha * var + (1 - alpha) *
  (n - mu)**2``. ``max_norm``, if given, is a hard ceiling at every step.

  The warm-up steps are clipped only by ``max_norm``: with a high learning rate
  and no learning-rate warm-up, a model can blow up during them and ZClip then
  takes the large norms as normal (``examples/spikes.py`` shows it). Give it a
  ``max_norm`` in that case.

  Args:
    alpha: EMA factor in ``[0, 1)``.
    z_thresh: the z-score above which a norm is a spike (> 0).
    warmup_steps: finite steps used to initialise the statistics (>= 1).
    mode: ``"adaptive_scaling"`` or ``"mean"``.
    max_norm: an optional fixed ceiling on the global norm.
    eps: added to ``sigma`` in the z-score.
    nonfinite: the update of a step whose global norm is NaN or infinite:
      ``"zero"`` emits zeros, ``"propagate"`` passes it through unchanged (for a
      later guard such as ``optax.apply_if_finite``). Either way the history is
      left untouched and the step counted in ``extra["nonfinite_steps"]``.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ZClipState`; its
    stats' ``extra`` holds ``mean``, ``std``, ``z`` and ``nonfinite_steps``.
    Its stats' ``bound`` is the bound in force, finite after warm-up: on a
    spike, the norm it was clipped to; on any other step, the norm above which
    it would have been a spike, ``mu + z_thresh * (sigma + eps)`` (or
    ``max_norm`` if lower). During warm-up it is ``max_norm``, ``inf`` without
    one: nothing bounds those steps.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.zclip(warmup_steps=4)
    >>> state = tx.init(jnp.zeros(1))
    >>> for g in [1.0, 1.2, 0.8, 1.0, 50.0]:
    ...   u, state = tx.update(jnp.array([g]), state)
    >>> print(u, state.stats.extra["z"] > 2.5)
    [1.00255...] True

  References:
    Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
    <https://arxiv.org/abs/2504.02507>`_, 2025.
  """
  call = "zclip"
  _check_fraction(call, "alpha", alpha)
  check_bound(call, "z_thresh", z_thresh, positive=True)
  _check_steps(call, "warmup_steps", warmup_steps, 1)
  _check_choice(call, "mode", mode, ("adaptive_scaling", "mean"))
  if max_norm is not None:
    check_bound(call, "max_norm", max_norm)
  check_bound(call, "eps", eps)
  _check_choice(call, "nonfinite", nonfinite, _NONFINITE)
  ceiling = jnp.inf if max_norm is None else max_norm

  def init_fn(params):
    zero = jnp.zeros((), jnp.float32)
    extra = {"mean": zero, "std": zero, "z": zero}
    extra["nonfinite_steps"] = jnp.zeros((), jnp.int32)
    stats = _scalar_stats(call, extra)
    return ZClipState(
      jnp.zeros((), jnp.int32), zero, zero, stats, TreeShapes.of(params)
    )

  def update_fn(updates, state, params=None):
    del params
    state.tree.check(call, updates)
    norm = _global_norm(call, updates)
    finite = jnp.isfinite(norm)
    seen, mean, var = state.seen, state.mean, state.var
    warm = seen < warmup_steps

    # Warm-up: exact running mean and (population) variance, Welford's way.
    n = (seen + 1).astype(jnp.float32)
    delta = norm - mean
    warm_mean = mean + delta / n
    warm_var = (var * seen.astype(jnp.float32) + delta * (norm - warm_mean)) / n

    std = jnp.sqrt(var)
    z = (norm - mean) / (std + eps)
    spike = ~warm & (z > z_thresh)
    safe_z = jnp.where(spike, z, jnp.ones_like(z))
    # The stronger the outlier, the lower the adaptive bound.
    adaptive_bound = mean + jnp.square(z_thresh) * std / safe_z
    spike_bound = mean if mode == "mean" else adaptive_bound
    adaptive = jnp.where(spike, spike_bound, jnp.inf)
    ceiling32 = jnp.asarray(ceiling, jnp.float32)
    bound = jnp.minimum(adaptive, ceiling32)
    scale = _norms.clip_scale(norm, bound)
    # A logger sees the bound in force: on a step that is no spike, the norm
    # above which it would have been one (reported only; the rule is z > z_thresh).
    threshold = jnp.minimum(mean + z_thresh * (std + eps), ceiling32)
    in_force = jnp.where(warm | spike, bound, threshold)

    ema_input = jnp.where(spike, spike_bound, norm)  # the EMA sees the clipped norm
    ema_mean = alpha * mean + (1 - alpha) * ema_input
    ema_var = alpha * var + (1 - alpha) * jnp.square(ema_input - ema_mean)
    new_mean = jnp.where(finite, jnp.where(warm, warm_mean, ema_mean), mean)
    new_var = jnp.where(finite, jnp.where(warm, warm_var, ema_var), var)

    extra = {
      "mean": new_mean,
      "std": jnp.sqrt(new_var),
      "z": jnp.where(warm, jnp.zeros_like(z), z),
      "nonfinite_steps": state.stats.extra["nonfinite_steps"] + _count(~finite),
    }
    stats = make_stats(call, norm, scale, in_force, scale < 1, extra)
    new_state = ZClipState(seen + _count(finite), new_mean, new_var, stats, state.tree)
    return _finish(updates, _factors(scale, finite), nonfinite), new_state

  return optax.GradientTransformation(init_fn, update_fn)


# --- AdaGC -----------------------------------------------------------------------


class AdaGCState(NamedTuple):
  """AdaGC's per-tensor EMA of clipped norms.

  Attributes:
    seen: shape ``()``, int32: the finite steps seen so far.
    gamma: one float32 scalar per tensor: the smallest clipped norm during
      warm-up, then an EMA of the clipped norms (0 while a tensor has had no
      nonzero gradient); one vector held as a :class:`~clipjax.Stacked` that
      reads as a tree like the params (``gamma["w"]``), a scalar for params
      that are one array.
    stats: the last update's :class:`ClipStats` (zeros before the first): a
      norm, scale and bound per tensor, and ``extra["nonfinite_steps"]``.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> clipjax.adagc().init({"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}).gamma
    Stacked({'b': Array(0., dtype=float32), 'w': Array(0., dtype=float32)})
  """

  seen: jax.Array  # shape=(), int32: finite steps seen
  gamma: Any  # one float32 scalar per leaf, one vector (a Stacked)
  stats: ClipStats


def adagc(
  relative: jax.typing.ArrayLike = 1.05,
  beta: jax.typing.ArrayLike = 0.98,
  warmup_steps: int = 100,
  warmup_max_norm: jax.typing.ArrayLike = 1.0,
  *,
  nonfinite: NonFinite = "zero",
) -> optax.GradientTransformation:
  """Per-tensor clipping to ``relative`` times an EMA of each tensor's norm.

  AdaGC. During warm-up (steps ``t < warmup_steps``, counted from 1, as in the
  reference code) the whole update is clipped to global norm
  ``warmup_max_norm`` and each tensor's ``gamma`` tracks the smallest clipped
  norm seen. Afterwards tensor ``i`` is clipped to ``relative * gamma_i`` and
  ``gamma_i <- beta * gamma_i + (1 - beta) * ||clipped g_i||``. A tensor with no
  nonzero gradient yet has no history and is not clipped (the reference would
  zero it for ever).

  Args:
    relative: the bound relative to the EMA (``lambda_rel``, > 0).
    beta: EMA factor in ``[0, 1)``.
    warmup_steps: length of the warm-up (>= 1).
    warmup_max_norm: the global bound during warm-up (``lambda_abs``).
    nonfinite: the update of a step whose global norm is NaN or infinite:
      ``"zero"`` emits zeros, ``"propagate"`` passes it through unchanged (for a
      later guard such as ``optax.apply_if_finite``). Either way the history is
      left untouched and the step counted in ``extra["nonfinite_steps"]``.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`AdaGCState`; its
    stats hold one norm, scale and bound per tensor.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.adagc(warmup_steps=2, warmup_max_norm=10.0)
    >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])}
    >>> state = tx.init(g)
    >>> _, state = tx.update(g, state)  # warm-up: gamma = (5, 1)
    >>> spike = {"a": jnp.array([30.0, 40.0]), "b": jnp.array([1.0])}
    >>> u, state = tx.update(spike, state)
    >>> print(u["a"], u["b"])  # "a" clipped to 1.05 * 5, "b" untouched
    [3.15 4.2 ] [1.]

  References:
    Wang et al., `AdaGC: Improving Training Stability for Large Language Model
    Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025.
  """
  call = "adagc"
  check_bound(call, "relative", relative, positive=True)
  _check_fraction(call, "beta", beta)
  _check_steps(call, "warmup_steps", warmup_steps, 1)
  check_bound(call, "warmup_max_norm", warmup_max_norm)
  _check_choice(call, "nonfinite", nonfinite, _NONFINITE)

  def init_fn(params):
    fields = _scalar_fields(params)
    zeros = _wrap_vector(fields, jnp.zeros((len(fields.leaves),), jnp.float32))
    extra = {"nonfinite_steps": jnp.zeros((), jnp.int32)}
    stats = make_stats(call, zeros, zeros, zeros, 0.0, extra)
    return AdaGCState(jnp.zeros((), jnp.int32), zeros, stats)

  def check_fits(updates, fields, held):
    """Raises ``ValueError`` naming the leaf unless ``held`` is a gamma for them."""
    if fields.treedef == _ONE_ARRAY and np.shape(held) == ():
      return
    check_stacked_fits(
      call,
      "state's gamma",
      held,
      fields.layout,
      updates,
      lambda: jax.tree.map(lambda _: jax.ShapeDtypeStruct((), jnp.float32), updates),
    )

  def update_fn(updates, state, params=None):
    del params
    fields = _scalar_fields(updates)
    check_fits(updates, fields, state.gamma)
    stacked, total = _leaf_norms(call, updates)
    finite = jnp.isfinite(total)
    gamma = _vector(state.gamma)
    first = state.seen == 0
    warm = first | (state.seen + 1 < warmup_steps)
    warm_scale = _norms.clip_scale(total, warmup_max_norm)

    # Bounds, scales and the new EMA, on the norms stacked.
    known = gamma > 0
    rel_bound = jnp.where(known, relative * gamma, jnp.inf)
    bounds = jnp.where(warm, jnp.asarray(warmup_max_norm, jnp.float32), rel_bound)
    all_scales = jnp.where(warm, warm_scale, _norms.clip_scale(stacked, rel_bound))
    clipped = stacked * all_scales
    # gamma == 0 means "no history yet"; a zero norm is not an observation.
    smallest = jnp.where(known, jnp.minimum(gamma, clipped), clipped)
    warm_gamma = jnp.where(clipped > 0, smallest, gamma)
    ema_gamma = jnp.where(known, beta * gamma + (1 - beta) * clipped, clipped)
    gamma_next = jnp.where(warm, warm_gamma, ema_gamma)
    new_gamma = jnp.where(finite, gamma_next, gamma)

    fraction = fields.fraction_below_one([all_scales])
    extra = {"nonfinite_steps": state.stats.extra["nonfinite_steps"] + _count(~finite)}
    wrap = lambda v: _wrap_vector(fields, v)
    stats = make_stats(
      call, wrap(stacked), wrap(all_scales), wrap(bounds), fraction, extra
    )
    new_state = AdaGCState(state.seen + _count(finite), wrap(new_gamma), stats)
    return _finish(updates, _factors(all_scales, finite), nonfinite), new_state

  return optax.GradientTransformation(init_fn, update_fn)


# --- quantile clipping -----------------------------------------------------------


class QuantileClipState(NamedTuple):
  """The bound learned by geometric quantile updates.

  Attributes:
    max_norm: shape ``()``, float32: the bound the next update is clipped to.
    stats: the last update's :class:`ClipStats` (zeros before the first); its
      ``extra`` holds ``unclipped_fraction`` and ``nonfinite_steps``.
    tree: the leaf paths and shapes of the tree ``init`` saw, as static
      metadata (no arrays), so that ``update`` given another tree raises
      ``ValueError`` naming the first leaf that differs.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> clipjax.quantile_clip(initial_max_norm=2.0).init(jnp.zeros(3)).max_norm
    Array(2., dtype=float32)
  """

  max_norm: jax.Array  # shape=(), float32: the bound for the next update
  stats: ClipStats
  tree: TreeShapes = TreeShapes()  # static: the tree init saw


def quantile_clip(
  target_quantile: jax.typing.ArrayLike = 0.5,
  learning_rate: jax.typing.ArrayLike = 0.2,
  initial_max_norm: jax.typing.ArrayLike = 1.0,
  *,
  nonfinite: NonFinite = "zero",
) -> optax.GradientTransformation:
  """Per-tensor clipping to a bound that tracks a quantile of the tensor norms.

  Each tensor is clipped to the current bound ``C``; then, with ``b`` the
  fraction of tensors that were not clipped (norm ``<= C``),
  ``C <- C * exp(-learning_rate * (b - target_quantile))``: the geometric
  update of Andrew et al., here over the tensors of one update rather than over
  the examples of a batch (the noised per-example form is for privacy).

  Args:
    target_quantile: the fraction of tensors to leave unclipped, in ``[0, 1]``.
    learning_rate: the step size of the geometric update (>= 0).
    initial_max_norm: the first bound (> 0).
    nonfinite: the update of a step whose global norm is NaN or infinite:
      ``"zero"`` emits zeros, ``"propagate"`` passes it through unchanged (for a
      later guard such as ``optax.apply_if_finite``). Either way the history is
      left untouched and the step counted in ``extra["nonfinite_steps"]``.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`QuantileClipState`.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.quantile_clip(0.5, learning_rate=0.2, initial_max_norm=1.0)
    >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
    >>> u, state = tx.update(g, tx.init(g))
    >>> print(u["a"], u["b"], state.max_norm)  # half unclipped: C stays
    [0.6 0.8] [0.5] 1.0

  References:
    Andrew et al., `Differentially Private Learning with Adaptive Clipping
    <https://arxiv.org/abs/1905.03871>`_, 2021.
  """
  call = "quantile_clip"
  _check_fraction(call, "target_quantile", target_quantile, closed=True)
  check_bound(call, "learning_rate", learning_rate)
  check_bound(call, "initial_max_norm", initial_max_norm, positive=True)
  _check_choice(call, "nonfinite", nonfinite, _NONFINITE)

  def init_fn(params):
    extra = {
      "unclipped_fraction": jnp.zeros((), jnp.float32),
      "nonfinite_steps": jnp.zeros((), jnp.int32),
    }
    bound = jnp.asarray(initial_max_norm, jnp.float32)
    return QuantileClipState(bound, _scalar_stats(call, extra), TreeShapes.of(params))

  def update_fn(updates, state, params=None):
    del params
    state.tree.check(call, updates)
    stacked, total = _leaf_norms(call, updates)
    finite = jnp.isfinite(total)
    bound = state.max_norm
    scales = _norms.clip_scale(stacked, _norms.safe_bound(bound, jnp.float32))
    if stacked.size:
      unclipped = jnp.mean((stacked <= bound).astype(jnp.float32))
      step = jnp.exp(-jnp.asarray(learning_rate) * (unclipped - target_quantile))
      new_bound = jnp.where(finite, bound * step, bound)
      smallest = jnp.min(scales)
    else:
      unclipped, new_bound = jnp.ones((), jnp.float32), bound
      smallest = jnp.ones((), jnp.float32)
    extra = {
      "unclipped_fraction": unclipped,
      "nonfinite_steps": state.stats.extra["nonfinite_steps"] + _count(~finite),
    }
    stats = make_stats(call, total, smallest, bound, 1.0 - unclipped, extra)
    new_state = QuantileClipState(new_bound.astype(jnp.float32), stats, state.tree)
    return _finish(updates, _factors(scales, finite), nonfinite), new_state

  return optax.GradientTransformation(init_fn, update_fn)


# --- Clippy ----------------------------------------------------------------------


def _clippy_ratio(
  u: jax.Array, w: jax.Array, relative: Any, absolute: Any
) -> jax.Array:
  """``max_j |u_j| / allowance_j`` (float32), in one pass over ``u`` and ``w``.

  0 for coordinates that do not move, ``inf`` for one that moves with no
  allowance (``allowance <= 0``). One max reduction: as a max and an
  ``any``, XLA:CPU reads ``u`` and ``w`` twice.
  """
  size = lax.abs(u).astype(jnp.float32)
  weight = lax.abs(jnp.asarray(w)).astype(jnp.float32)
  allowance = lax.add(
    lax.mul(_norms._like(relative, weight), weight), _norms._like(absolute, weight)
  )
  zero, one = lax.full_like(size, 0), lax.full_like(size, 1)
  has = lax.gt(allowance, zero)
  moves = lax.gt(size, zero)
  ratio = lax.div(size, lax.select(has, allowance, one))
  stuck = lax.bitwise_and(moves, lax.le(allowance, zero))
  ratio = lax.select(stuck, lax.full_like(size, np.inf), ratio)
  ratio = lax.select(moves, ratio, zero)
  init = np.zeros((), np.float32)
  if ratio.ndim < 2 or ratio.size == 0:
    return lax.reduce(ratio, init, lax.max, tuple(range(ratio.ndim)))
  # Rows first, then the row results: XLA:CPU splits a reduction to a vector
  # across its threads, but runs a reduction to a scalar on one.
  rows = lax.reduce(ratio.reshape(ratio.shape[0], -1), init, lax.max, (1,))
  return lax.reduce(rows, init, lax.max, (0,))


def clippy(
  relative: jax.typing.ArrayLike = 0.1, absolute: jax.typing.ArrayLike = 1e-7
) -> optax.GradientTransformation:
  """Scales each tensor's update so no coordinate moves more than its allowance.

  Clippy: tensor ``i``'s update ``u`` is multiplied by
  ``min(1, min_j (relative * |w_j| + absolute) / |u_j|)``, so the direction is
  kept and every coordinate moves at most ``relative * |w_j| + absolute``. It
  bounds the update it receives, so chain it after the optimizer:
  ``optax.chain(optax.adagrad(lr), clipjax.clippy())``. Stateless; a non-finite
  update propagates. The defaults are those of the reference implementation
  (TensorFlow Recommenders' ``ClippyAdagrad``).

  Args:
    relative: the allowance relative to ``|w|`` (>= 0).
    absolute: the allowance added to it (>= 0; > 0 lets zero weights move).

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ClipStats`
    with, per tensor, ``norm`` = the largest ``|u_j| / allowance_j`` (the
    bound is 1). ``update`` raises ``ValueError`` without params.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.clippy(relative=0.1, absolute=0.0)
    >>> w = jnp.array([1.0, 10.0])
    >>> u, s = tx.update(jnp.array([0.5, 0.5]), tx.init(w), w)
    >>> print(u, s.norm)  # 0.5 > 0.1 * 1: scaled by 0.2
    [0.1 0.1] 5.0

  References:
    Tang et al., `Improving Training Stability for Multitask Ranking Models in
    Recommender Systems <https://arxiv.org/abs/2302.09178>`_, 2023.
  """
  call = "clippy"
  check_bound(call, "relative", relative)
  check_bound(call, "absolute", absolute)

  def apply(updates, params):
    require_params(call, params)
    _norms.check_float_leaves(call, updates)
    leaves, treedef = jax.tree.flatten(updates)
    param_leaves = treedef.flatten_up_to(params)  # type: ignore[attr-defined]
    ratios = [
      _clippy_ratio(u, w, relative, absolute)
      for u, w in zip(leaves, param_leaves, strict=True)
    ]
    new = [
      _norms.scale_leaf(u, _norms.clip_scale(r, 1.0))
      for u, r in zip(leaves, ratios, strict=True)
    ]
    # The statistics: the same formula, on the ratios stacked.
    fields = _scalar_fields(updates)
    stacked = fields.stack(ratios)
    scales = [_norms.clip_scale(r, 1.0) for r in stacked]
    fraction = fields.fraction_below_one(scales)
    stats = make_stats(call, fields.wrap(stacked), fields.wrap(scales), 1.0, fraction)
    return jax.tree.unflatten(treedef, new), stats

  return with_stats(apply)


def _sums(operands: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
  """The sum of each of ``operands`` (arrays of one shape), in one pass.

  One variadic reduction, which XLA fuses with what computes its operands
  into one loop; as separate reductions, XLA:CPU reads the inputs once each.
  """
  init = tuple(jnp.zeros((), x.dtype) for x in operands)

  def add(a, b):
    return tuple(x + y for x, y in zip(a, b, strict=True))

  shape = operands[0].shape
  if len(shape) < 2 or operands[0].size == 0:
    return lax.reduce(operands, init, add, tuple(range(len(shape))))
  # Rows first, then the row results: XLA:CPU splits a reduction to a vector
  # across its threads, but runs a reduction to a scalar on one.
  as_rows = tuple(x.reshape(shape[0], -1) for x in operands)
  return lax.reduce(lax.reduce(as_rows, init, add, (1,)), init, add, (0,))


def _two_global_norms(
  plain_sums: list[tuple[jax.Array, jax.Array]],
  magnitudes: Callable[[], list[tuple[jax.Array, jax.Array]]],
  wide: Any,
) -> tuple[jax.Array, jax.Array]:
  """Two global norms (float32) from each leaf's two sums of squares, overflow-safe.

  As :func:`~clipjax._norms.global_norm`: if either total overflows, one
  ``lax.cond`` recomputes both from squares scaled by ``2**-k`` of the
  leaves' two magnitudes (``magnitudes()``, in ``wide``), flattened into the
  rows of one matrix each (:func:`_padded_rows`): a few kernels, not one per
  leaf.
  """
  if not plain_sums:
    zero = jnp.zeros((), jnp.float32)
    return zero, zero

  def plain(totals):
    return jnp.sqrt(lax.optimization_barrier(totals))

  def rescaled(totals):
    del totals
    down = _norms._down([wide])[wide]
    up = np.asarray(2.0 ** _norms._shift(wide), wide)
    pairs = magnitudes()
    matrices = [_padded_rows([p[j] for p in pairs])[0] for j in (0, 1)]
    sums = [jnp.sum(_norms._squares(m, wide, down)) for m in matrices]
    return jnp.sqrt(jnp.stack(sums)) * up

  # Added one by one: a chain of adds compiles faster than a stack of hundreds
  # of scalars.
  totals = jnp.stack(
    [functools.reduce(lax.add, [s[j].astype(wide) for s in plain_sums]) for j in (0, 1)]
  )
  norms = lax.cond(jnp.any(jnp.isposinf(totals)), rescaled, plain, totals)
  norms = norms.astype(jnp.float32)
  return norms[0], norms[1]


# --- SPAM's spike-aware clipping -------------------------------------------------


class SpamClipState(NamedTuple):
  """SPAM's running second moment of each coordinate.

  Attributes:
    seen: shape ``()``, int32: the finite steps seen so far (clipping starts
      at step ``warmup_steps``).
    nu: a tree like the params, float32: the EMA of the clipped ``g**2``,
      coordinate by coordinate (not bias-corrected).
    stats: the last update's :class:`ClipStats` (zeros before the first), with
      ``extra["nonfinite_steps"]``.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> clipjax.spam_clip().init({"w": jnp.zeros((2, 3))}).nu["w"].shape
    (2, 3)
  """

  seen: jax.Array  # shape=(), int32: finite steps seen
  nu: Any  # a tree like the params, float32: EMA of the clipped g**2
  stats: ClipStats


def spam_clip(
  threshold: jax.typing.ArrayLike = 5000.0,
  beta2: jax.typing.ArrayLike = 0.999,
  *,
  warmup_steps: int = 20,
  nonfinite: NonFinite = "zero",
) -> optax.GradientTransformation:
  """Element-wise clipping of coordinates that spike against their second moment.

  SPAM's spike-aware clipping: a coordinate with ``g**2 > threshold * v`` is
  set to ``sign(g) * sqrt(threshold * v)``, where ``v`` is the running (not
  bias-corrected) second moment ``v <- beta2 * v + (1 - beta2) * g_clipped**2``.
  As in the reference code no clipping happens before step ``warmup_steps``
  (``grad_accu_steps`` there). Coordinates with ``v == 0`` (never seen nonzero,
  e.g. embedding rows used for the first time) are left alone, where the
  reference would zero them for ever.

  Args:
    threshold: the spike threshold ``theta`` (> 0).
    beta2: the second-moment EMA factor in ``[0, 1)``, Adam's ``b2``.
    warmup_steps: the first step that may clip (>= 1).
    nonfinite: the update of a step whose global norm is NaN or infinite:
      ``"zero"`` emits zeros, ``"propagate"`` passes it through unchanged (for a
      later guard such as ``optax.apply_if_finite``). Either way the history is
      left untouched and the step counted in ``extra["nonfinite_steps"]``.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`SpamClipState`;
    its stats hold the global norm before clipping, the ratio of the norm
    after to before as ``scale``, and the fraction of coordinates clipped.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.spam_clip(threshold=4.0, beta2=0.5, warmup_steps=1)
    >>> state = tx.init(jnp.zeros(2))
    >>> _, state = tx.update(jnp.array([1.0, 1.0]), state)  # v = 0.5
    >>> u, state = tx.update(jnp.array([-3.0, 1.0]), state)
    >>> print(u)  # 9 > 4 * 0.5: set to -sqrt(2)
    [-1.4142135  1.       ]

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training <https://arxiv.org/abs/2501.06842>`_, 2025.
  """
  call = "spam_clip"
  check_bound(call, "threshold", threshold, positive=True)
  _check_fraction(call, "beta2", beta2)
  _check_steps(call, "warmup_steps", warmup_steps, 1)
  _check_choice(call, "nonfinite", nonfinite, _NONFINITE)

  def init_fn(params):
    nu = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    extra = {"nonfinite_steps": jnp.zeros((), jnp.int32)}
    return SpamClipState(jnp.zeros((), jnp.int32), nu, _scalar_stats(call, extra))

  def clip(g, v, active):
    """The update and, without the square root, its squares (float32); the spikes.

    Where it spiked, the update is ``sign(g) * sqrt(limit)`` and its square
    ``limit``: the square root is only taken by the update's own kernel, so
    that XLA has no costly value to share between the kernels of a leaf,
    which then each read ``g`` and ``v`` rather than a clipped copy written
    out first.
    """
    g32 = g.astype(jnp.float32)
    square, limit = lax.mul(g32, g32), lax.mul(_norms._like(threshold, v), v)
    zero = lax.full_like(v, 0)
    spike = lax.bitwise_and(lax.gt(v, zero), lax.gt(square, limit))
    spike = lax.bitwise_and(lax.broadcast(active, spike.shape), spike)
    root = lax.mul(lax.sign(g32), lax.sqrt(limit))
    out = lax.select(spike, root, g32).astype(g.dtype)
    return out, lax.select(spike, limit, square), spike

  def update_fn(updates, state, params=None):
    del params
    check_state_fits(call, updates, state.nu, updates)
    _norms.check_float_leaves(call, updates)
    active = state.seen + 1 >= warmup_steps
    leaves, treedef = jax.tree.flatten(updates)
    nus = treedef.flatten_up_to(state.nu)  # type: ignore[attr-defined]

    def sums(g, v):
      """The leaf's sums of ``|g|**2`` and of its update's squares, in its
      accumulation dtype, and its number of spikes."""
      out, after, spike = clip(g, v, active)
      acc = _norms.accumulation_dtype(g.dtype)
      if jnp.finfo(g.dtype).bits < 32:
        # The norm of the update as it is rounded to its dtype.
        out = out.astype(acc)
        after = lax.mul(out, out)
      # The count in the sums' dtype: XLA rejects a reduction of mixed
      # precisions (float64 sums under jax_enable_x64).
      return _sums((_norms._squares(g, acc), after.astype(acc), spike.astype(acc)))

    def magnitudes(wide):
      """Each leaf's ``|g|`` and ``|update|``, in ``wide`` (the overflow path)."""
      return [
        (_norms._magnitudes(g, wide), _norms._magnitudes(clip(g, v, active)[0], wide))
        for g, v in zip(leaves, nus, strict=True)
      ]

    # Pass 1, one reduction per leaf, from g and v: the norms before and after
    # clipping and the spikes. Pass 2, what needs to know whether the step is
    # finite: the update and nu, each one loop over g and v (and p).
    per_leaf = [sums(g, v) for g, v in zip(leaves, nus, strict=True)]
    wide = _norms.widest_accumulation_dtype(leaves)
    norm, after = _two_global_norms(per_leaf, lambda: magnitudes(wide), wide)
    finite = lax.is_finite(norm)
    b2, rest = _norms._like(beta2, norm), _norms._like(1 - beta2, norm)
    new, new_nus = [], []
    for g, v in zip(leaves, nus, strict=True):
      out, squares, _ = clip(g, v, active)
      bad = lax.full_like(out, 0) if nonfinite == "zero" else g
      new.append(lax.select(lax.broadcast(finite, out.shape), out, bad))
      v_next = lax.add(
        lax.mul(_norms._like(b2, v), v), lax.mul(_norms._like(rest, v), squares)
      )
      new_nus.append(lax.select(lax.broadcast(finite, v.shape), v_next, v))
    ratio = jnp.where(norm > 0, after / jnp.where(norm > 0, norm, 1.0), 1.0)
    size = sum(int(g.size) for g in leaves)
    count = functools.reduce(
      lax.add, [s[2].astype(jnp.float32) for s in per_leaf], jnp.zeros((), jnp.float32)
    )
    fraction = count / size if size else jnp.zeros((), jnp.float32)
    extra = {"nonfinite_steps": state.stats.extra["nonfinite_steps"] + _count(~finite)}
    stats = make_stats(call, norm, ratio, threshold, fraction, extra)
    new_state = SpamClipState(
      state.seen + _count(finite), jax.tree.unflatten(treedef, new_nus), stats
    )
    return jax.tree.unflatten(treedef, new), new_state

  return optax.GradientTransformation(init_fn, update_fn)


# --- skip_and_clip ---------------------------------------------------------------


class SkipAndClipState(NamedTuple):
  """The wrapped optimizer's state and the guard's statistics.

  Attributes:
    inner_state: the state of the wrapped ``inner`` transformation
      (``optax.EmptyState()`` without one), left as it was on skipped steps.
    stats: the last update's :class:`ClipStats` (zeros before the first); its
      ``extra`` holds ``skipped`` (this step, 0 or 1) and ``skipped_steps``
      (so far).

  Examples:
    >>> import jax.numpy as jnp, optax, clipjax
    >>> tx = clipjax.skip_and_clip(1.0, 10.0, inner=optax.sgd(0.1))
    >>> tx.init(jnp.zeros(2)).inner_state
    (EmptyState(), EmptyState())
  """

  inner_state: Any  # the wrapped transformation's state (EmptyState if none)
  stats: ClipStats


def skip_and_clip(
  max_norm: jax.typing.ArrayLike,
  drop_norm: jax.typing.ArrayLike,
  *,
  inner: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
  """Skips steps whose global norm is above ``drop_norm`` or not finite.

  A skipped step gives a zero update; with ``inner`` (an optimizer to wrap),
  its state is left exactly as it was, so momentum and step counts are not
  touched by the bad batch. Other steps are clipped to global norm
  ``max_norm`` (before ``inner`` sees them).

  Choose ``drop_norm`` above the norms of ordinary steps: if it is below the
  gradient norm at initialisation, every step is skipped and the model never
  moves. ``extra["skipped_steps"]`` (through :func:`clip_stats`) shows it.

  Args:
    max_norm: the clipping bound (may be ``inf`` to only skip).
    drop_norm: norms above this skip the step (may be ``inf`` to skip only
      non-finite steps); at least a finite ``max_norm`` (``ValueError``
      otherwise, when both are concrete).
    inner: an optional transformation to wrap, e.g. ``optax.adam(1e-3)``.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`SkipAndClipState`;
    its stats' ``extra`` holds ``skipped`` (this step, 0 or 1) and
    ``skipped_steps`` (so far).

  Examples:
    >>> import jax.numpy as jnp, optax, clipjax
    >>> tx = clipjax.skip_and_clip(1.0, 100.0, inner=optax.sgd(0.1))
    >>> state = tx.init(jnp.zeros(2))
    >>> u, state = tx.update(jnp.array([3.0, 4.0]), state)
    >>> print(u)
    [-0.06 -0.08]
    >>> u, state = tx.update(jnp.array([300.0, 400.0]), state)
    >>> print(u, state.stats.extra["skipped_steps"])
    [0. 0.] 1
  """
  call = "skip_and_clip"
  check_bound(call, "max_norm", max_norm, allow_inf=True)
  check_bound(call, "drop_norm", drop_norm, allow_inf=True)
  if is_concrete(max_norm) and is_concrete(drop_norm):
    clip_at, drop_at = float(np.asarray(max_norm)), float(np.asarray(drop_norm))
  else:
    clip_at, drop_at = np.inf, np.inf
  if np.isfinite(clip_at) and drop_at < clip_at:
    raise ValueError(
      f"{call}(max_norm={max_norm!r}, drop_norm={drop_norm!r}): drop_norm must be"
      f" >= max_norm; below it, every step with a norm above {drop_norm!r} would"
      f" be skipped and none clipped to {max_norm!r} (max_norm=inf only skips)."
    )

  def init_fn(params):
    inner_state = optax.EmptyState() if inner is None else inner.init(params)
    extra = {
      "skipped": jnp.zeros((), jnp.int32),
      "skipped_steps": jnp.zeros((), jnp.int32),
    }
    return SkipAndClipState(inner_state, _scalar_stats(call, extra))

  def update_fn(updates, state, params=None):
    norm = _global_norm(call, updates)
    skip = ~jnp.isfinite(norm) | (norm > drop_norm)
    scale = _norms.clip_scale(norm, max_norm)
    clipped = _norms.scale_tree(updates, scale)
    if inner is None:
      out, inner_state = clipped, state.inner_state
    else:
      out, new_inner = inner.update(clipped, state.inner_state, params)
      inner_state = jax.tree.map(
        lambda old, new: jnp.where(skip, old, new), state.inner_state, new_inner
      )
    out = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros((), u.dtype), u), out)
    extra = {
      "skipped": _count(skip),
      "skipped_steps": state.stats.extra["skipped_steps"] + _count(skip),
    }
    stats = make_stats(
      call, norm, jnp.where(skip, 0.0, scale), max_norm, scale < 1, extra
    )
    return out, SkipAndClipState(inner_state, stats)

  return optax.GradientTransformation(init_fn, update_fn)

"""Fixed-bound clippers; the names shared with optax 0.2.8 are drop-ins.

Each clipper is a thin preset over the kernels in ``_norms``: pick the blocks
(scope), compute one bound per block (threshold), scale. Differences from optax,
all where optax is numerically wrong:

- a zero norm is never divided by: with a zero bound the result is zeros, not
  NaN (``clip_by_global_norm``, ``clip_by_block_rms``);
- norms accumulate in float32 (float64 for float64), and rescale on overflow,
  so a float16 or bfloat16 tree whose sum of squares overflows in its own
  dtype still clips to a finite result of the right norm;
- per-example gradients whose norm is not finite are dropped (they add zero)
  and counted among the clipped, instead of making the whole sum NaN;
- ``unitwise_norm`` returns float32 norms for half-precision input, so that a
  norm beyond float16's range stays finite.

The state of each clipper is a :class:`~clipjax.ClipStats` instead of optax's
``EmptyState``; ``update`` still accepts ``state=None``.
"""

import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipjax import _norms
from clipjax._checks import MANY_BOUNDS, check_bound, shown
from clipjax._layout import Stacked
from clipjax._stats import ClipStats, make_stats, with_stats

# A global, per-leaf or per-slice bound is one scalar; what to use instead.
_GLOBAL_HINT = (
  "The global norm has one bound; for a bound per group of leaves use"
  " clip_by_group_norm. " + MANY_BOUNDS
)
_BLOCK_HINT = (
  "One bound holds for every block; for a bound per leaf use"
  " clip_by_group_norm with one group per leaf. " + MANY_BOUNDS
)


def require_params(call: str, params: Any) -> None:
  """Raises ``ValueError`` naming ``call`` when ``params`` were not given."""
  if params is None:
    raise ValueError(
      f"{call} needs the parameters: call update(updates, state, params) with"
      " params (optax passes them when you give them to the chain's update)."
    )


def fraction_true(flags: list[jax.Array]) -> jax.Array:
  """Fraction of True among all elements of ``flags`` (0 for none)."""
  total = sum(int(f.size) for f in flags)
  if total == 0:
    return jnp.zeros((), jnp.float32)
  count = sum(jnp.sum(f, dtype=jnp.float32) for f in flags)
  return jnp.asarray(count, jnp.float32) / total


def _clip_blocks(
  name: str,
  updates: Any,
  axes_of: Callable[[jax.Array], _norms.Axes],
  bound: jax.typing.ArrayLike | None,
  *,
  divisor: Callable[[jax.Array], float] | None = None,
  bound_of: Callable[[jax.Array], jax.Array] | None = None,
  companions: list[jax.Array] | None = None,
) -> tuple[Any, ClipStats]:
  """Clips each block of each leaf to its bound: the shared per-block path.

  Each leaf's scale factor is computed from its own block norms
  (:func:`_norms.block_norms`), so that XLA fuses it with the scaling as it
  does optax's; the statistics apply the same formulas to the norms stacked,
  one array per shape of block (:class:`StackedStats`), so that the state
  does not grow with the leaves and the program by only a few ops per leaf.

  Args:
    name: the clipper's name, for errors and statistics.
    updates: the update tree.
    axes_of: the axes one block of a leaf spans.
    bound: the bound of every block (a scalar), or None with ``bound_of``.
    divisor: maps a leaf to the number its block norms are divided by before
      they are compared with the bound (e.g. ``sqrt(size)`` for the RMS).
    bound_of: maps the block norms of a companion (per leaf, or stacked) to
      the bounds of the update's blocks.
    companions: arrays of the updates' shapes, one per leaf (e.g. the params),
      whose block norms give the bounds; their sums are taken with the
      updates', so that the overflow check runs once.
  """
  _norms.check_float_leaves(name, updates)
  leaves, treedef = jax.tree.flatten(updates)
  companions = companions or []
  n = len(leaves)
  axes = [axes_of(x) for x in leaves]
  all_norms = _norms.block_norms([*leaves, *companions], axes + axes[: len(companions)])
  fields = StackedStats(leaves, axes, treedef)
  safe = None if bound_of is not None else _norms.safe_bound(bound, jnp.float32)

  def clip(norm, divisor, companion):
    """Measures, bounds and scales of blocks: one leaf's, or stacked."""
    if divisor is not None:
      norm = norm / divisor
    if bound_of is None:
      return norm, safe, _norms.clip_scale(norm, safe, checked=True)
    bound = bound_of(companion)
    return norm, bound, _norms.clip_scale(norm, bound)

  new = []
  for i, x in enumerate(leaves):
    d = None if divisor is None else np.asarray(divisor(x), all_norms[i].dtype)
    _, _, scale = clip(all_norms[i], d, all_norms[n + i] if companions else None)
    new.append(_norms.scale_leaf(x, _norms.keepdims(scale, x, axes[i])))
  # The statistics: the same formulas, on the norms stacked.
  groups = len(fields.layout.groups)
  g_divisor = [None] * groups if divisor is None else fields.per_row(divisor)
  g_companion = fields.stack(all_norms[n:]) if companions else [None] * groups
  per_group = zip(fields.stack(all_norms[:n]), g_divisor, g_companion, strict=True)
  results = [clip(*args) for args in per_group]
  norms, bounds, scales = ([r[k] for r in results] for k in range(3))
  # A scalar bound is recorded once per block, as the companions' bounds are.
  bounds = [jnp.broadcast_to(b, s.shape) for b, s in zip(bounds, scales, strict=True)]
  stats = make_stats(
    name,
    fields.wrap(norms),
    fields.wrap(scales),
    fields.wrap(bounds),
    fields.fraction_below_one(scales),
  )
  return jax.tree.unflatten(treedef, new), stats


class StackedStats:
  """Per-leaf block values stacked into a :class:`Stacked`, for the statistics.

  One array per shape of block and accumulation dtype
  (:func:`_norms.block_layout`), reading as a tree like the updates; for an
  update that is a single array, that array.
  """

  def __init__(self, leaves: list[jax.Array], axes: list[_norms.Axes], treedef: Any):
    self.leaves = leaves
    self.layout = _norms.block_layout(leaves, axes, treedef)
    self.treedef = treedef
    self.blocks = sum(int(np.prod(s, dtype=np.int64)) for s in self.layout.shapes)

  def stack(self, values: Sequence[Any]) -> list[jax.Array]:
    """One array per group: its leaves' ``values`` stacked, in its dtype."""
    return [
      jnp.stack(
        [jnp.asarray(values[i]).astype(self.layout.group_dtype(g)) for i in idx]
      )
      for g, idx in enumerate(self.layout.groups)
    ]

  def per_row(self, fn: Callable[[jax.Array], float]) -> list[np.ndarray]:
    """``fn`` of each leaf, as a constant that broadcasts along each group's rows."""
    out = []
    for g, idx in enumerate(self.layout.groups):
      rank = len(self.layout.group_shape(g))
      values = np.asarray([fn(self.leaves[i]) for i in idx], self.layout.group_dtype(g))
      out.append(values.reshape((-1,) + (1,) * rank))
    return out

  def wrap(self, groups: list[jax.Array]) -> Any:
    """Stacked groups as a :class:`Stacked` (for one array, that array)."""
    if self.treedef == _ONE_ARRAY:
      return jax.tree.unflatten(self.treedef, [groups[0][0]])
    return Stacked.of(groups, self.layout)

  def fraction_below_one(self, scales: list[jax.Array]) -> jax.Array:
    """The fraction of blocks whose scale is below 1 (0 for no blocks)."""
    if not self.blocks:
      return jnp.zeros((), jnp.float32)
    counts = [jnp.sum(s < 1, dtype=jnp.float32) for s in scales]
    return functools.reduce(jnp.add, counts) / self.blocks


_ONE_ARRAY = jax.tree.structure(0)


def clip(
  max_delta: jax.typing.ArrayLike, *, stats: bool = True
) -> optax.GradientTransformation:
  """Clips updates element-wise, to be in ``[-max_delta, +max_delta]``.

  Drop-in for ``optax.clip``; its statistics treat each element as a block:
  ``norm`` is each leaf's largest ``|x|``, ``scale`` the smallest factor an
  element of that leaf was multiplied by, ``clipped_fraction`` the fraction of
  elements clipped.

  The statistics cost one more read of the update, which XLA:CPU does not
  fuse with the clipping (about 5-10% of a memory-bound ``clip`` + ``sgd``
  step); ``stats=False`` skips them and costs what ``optax.clip`` does.

  Args:
    max_delta: the largest absolute value of any element: a number or a traced
      scalar, or, as in ``optax.clip``, an array of element-wise bounds that
      broadcasts to every leaf's shape (``update`` raises ``ValueError`` naming
      a leaf whose shape it would change, where optax would broadcast the leaf).
    stats: whether to record the statistics (keyword only).

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ClipStats`,
    or ``optax.EmptyState()`` with ``stats=False``.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.clip(1.0)
    >>> u, s = tx.update({"w": jnp.array([-3.0, 0.5, 2.0])}, None)
    >>> print(u["w"], s.clipped_fraction)
    [-1.   0.5  1. ] 0.6666667
    >>> clipjax.clip(1.0, stats=False).update({"w": jnp.array([-3.0])}, None)
    ({'w': Array([-1.], dtype=float32)}, EmptyState())
    >>> u, s = clipjax.clip([0.1, 0.2]).update({"w": jnp.array([3.0, 4.0])}, None)
    >>> print(u["w"], s.scale["w"])  # one bound per column, as optax.clip
    [0.1 0.2] 0.033333335
  """
  check_bound("clip", "max_delta", max_delta, scalar=False)
  if not isinstance(stats, bool):
    raise TypeError(f"clip: stats must be True or False, got {stats!r}")
  delta_shape = tuple(np.shape(max_delta))

  def check_shapes(updates):
    for path, x in jax.tree_util.tree_flatten_with_path(updates)[0]:
      try:
        fits = np.broadcast_shapes(delta_shape, x.shape) == x.shape
      except ValueError:
        fits = False
      if not fits:
        raise ValueError(
          f"clip(max_delta={shown(max_delta)}): an array max_delta (shape"
          f" {delta_shape}) bounds elements and must broadcast to every leaf's"
          f" shape; leaf {jax.tree_util.keystr(path)} has shape {x.shape}."
        )

  def bounds(leaves):
    # A traced bound that is negative or NaN acts as 0, as in clip_scale; a
    # concrete one stays a numpy constant.
    delta = _norms.safe_bound(max_delta, jnp.float32)
    return delta, [delta.astype(x.dtype) for x in leaves]

  def clipped(leaves, deltas):
    return [jnp.clip(x, -d, d) for x, d in zip(leaves, deltas, strict=True)]

  if not stats:

    def update_fn(updates, state, params=None):
      del state, params
      _norms.check_float_leaves("clip", updates)
      if delta_shape:
        check_shapes(updates)
      leaves, treedef = jax.tree.flatten(updates)
      new = clipped(leaves, bounds(leaves)[1])
      return jax.tree.unflatten(treedef, new), optax.EmptyState()

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)

  def smallest_factor(x, d):  # of an array bound's element-wise factors
    acc = _norms.accumulation_dtype(x.dtype)
    factors = _norms.clip_scale(jnp.abs(x).astype(acc), d)
    return jnp.min(factors, initial=1.0)

  def apply(updates, params):
    del params
    _norms.check_float_leaves("clip", updates)
    if delta_shape:
      check_shapes(updates)
    leaves, treedef = jax.tree.flatten(updates)
    delta, deltas = bounds(leaves)
    new = clipped(leaves, deltas)
    pieces = _norms.peaks_and_counts(leaves, deltas)
    total = sum(int(x.size) for x in leaves)
    if total:
      sums = [jnp.sum(c, dtype=jnp.float32) for _, _, c in pieces]
      fraction = functools.reduce(jnp.add, sums) / total
    else:
      fraction = jnp.zeros((), jnp.float32)
    fields = StackedStats(leaves, [None] * len(leaves), treedef)
    peak_of = [(idx, p) for idx, p, _ in pieces]
    stacked_peaks = [
      _norms.in_leaf_order(peak_of, idx).astype(fields.layout.group_dtype(g))
      for g, idx in enumerate(fields.layout.groups)
    ]
    if delta_shape:
      each = zip(leaves, deltas, strict=True)
      scales = fields.stack([smallest_factor(x, d) for x, d in each])
    else:  # the largest element got the smallest factor: one clip_scale a group
      scales = [_norms.clip_scale(p, delta, checked=True) for p in stacked_peaks]
    stats = make_stats(
      "clip", fields.wrap(stacked_peaks), fields.wrap(scales), delta, fraction
    )
    return jax.tree.unflatten(treedef, new), stats

  return with_stats(apply)


def clip_by_global_norm(
  max_norm: jax.typing.ArrayLike,
  *,
  eps: jax.typing.ArrayLike = 0.0,
  axis_name: Any = None,
) -> optax.GradientTransformation:
  """Scales the whole update so that its L2 norm is at most ``max_norm``.

  Computes ``g * min(1, max_norm / (||g|| + eps))``, where ``||g||`` is the norm
  of all leaves together. Drop-in for ``optax.clip_by_global_norm``, without its
  NaN at zero norm and zero bound, and with float32 accumulation for half
  precision.

  Args:
    max_norm: the bound, a scalar: a number or a traced scalar (so that
      ``optax.inject_hyperparams`` and ``jax.vmap`` over bounds work). A
      string, a bool, an array, a tuple or a list of bounds raises
      ``ValueError`` at construction (for many bounds, ``jax.vmap``).
    eps: added to the norm before dividing; ``eps=1e-6`` reproduces
      ``torch.nn.utils.clip_grad_norm_``.
    axis_name: for use inside ``shard_map`` when each device holds a shard of
      the update tree (parameters sharded over that mesh axis, as in tensor
      parallelism): the norm is then the norm of the whole tree, as
      :func:`global_norm` computes it (sharded leaves summed over the axis,
      replicated leaves counted once), and every device applies the same
      scale. A tree that is replicated everywhere raises ``ValueError``: a
      gradient of replicated params was already summed by ``jax.grad``. In
      data parallelism (a whole local gradient on every device) this is not
      the option: clip the averaged gradient, after the exchange. Under
      ``jax.jit`` with sharded arrays, no option is needed: the norm is
      already global.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ClipStats`
    with scalar fields.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.clip_by_global_norm(1.0)
    >>> g = {"w": jnp.array([3.0, 4.0])}
    >>> u, s = tx.update(g, tx.init(g))
    >>> print(u["w"], s.norm, s.scale)
    [0.6 0.8] 5.0 0.2

  References:
    Pascanu et al., `On the difficulty of training recurrent neural networks
    <https://arxiv.org/abs/1211.5063>`_, 2013.
  """
  call = "clip_by_global_norm"
  check_bound(call, "max_norm", max_norm, hint=_GLOBAL_HINT)
  check_bound(call, "eps", eps)

  def apply(updates, params):
    del params
    _norms.check_float_leaves("clip_by_global_norm", updates)
    if axis_name is None:
      norm = _norms.global_norm(updates)
    else:
      norm = _norms.sharded_global_norm("clip_by_global_norm", updates, axis_name)
    scale = _norms.clip_scale(norm, max_norm, eps)
    stats = make_stats("clip_by_global_norm", norm, scale, max_norm, scale < 1)
    return _norms.scale_tree(updates, scale), stats

  return with_stats(apply)


def clip_by_norm(
  max_norm: jax.typing.ArrayLike, *, axis: _norms.AxisSpec = None
) -> optax.GradientTransformation:
  """Clips each leaf (or each slice of a leaf) to L2 norm at most ``max_norm``.

  Args:
    max_norm: the bound for every block, a scalar: a number or a traced scalar
      (for one bound per leaf, :func:`clip_by_group_norm`).
    axis: the axes one block spans. ``None``: the whole leaf. An int or tuple:
      those axes of every leaf, so that ``axis=(1, 2)`` clips a stacked
      ``(layers, in, out)`` kernel per layer. A callable ``leaf -> axes`` for
      mixed ranks, e.g. ``lambda x: tuple(range(1, x.ndim))`` clips every slice
      along a leading layer axis.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ClipStats`
    holding one norm and scale per block.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.clip_by_norm(1.0)
    >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4])}
    >>> u, s = tx.update(g, None)
    >>> print(u["a"], u["b"], s.norm["a"])
    [0.6 0.8] [0.3 0.4] 5.0
    >>> stacked = jnp.array([[[3.0, 4.0]], [[0.0, 0.5]]])  # two layers
    >>> u, _ = clipjax.clip_by_norm(1.0, axis=(1, 2)).update(stacked, None)
    >>> print(u.reshape(2, 2))
    [[0.6 0.8]
     [0.  0.5]]
  """
  check_bound("clip_by_norm", "max_norm", max_norm, hint=_BLOCK_HINT)

  def apply(updates, params):
    del params
    return _clip_blocks(
      "clip_by_norm",
      updates,
      lambda x: _norms.normalize_axes("clip_by_norm", x, axis),
      max_norm,
    )

  return with_stats(apply)


def clip_by_block_rms(threshold: jax.typing.ArrayLike) -> optax.GradientTransformation:
  """Clips each leaf so that its root mean square is at most ``threshold``.

  Drop-in for ``optax.clip_by_block_rms``, without its NaN for an all-zero leaf
  with a zero threshold (or for an empty leaf).

  Args:
    threshold: the largest RMS of each leaf, a scalar: a number or a traced
      scalar.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ClipStats`
    whose ``norm`` holds each leaf's RMS.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> u, s = clipjax.clip_by_block_rms(1.0).update(jnp.array([2.0, -2.0]), None)
    >>> print(u, s.norm)
    [ 1. -1.] 2.0
  """
  check_bound("clip_by_block_rms", "threshold", threshold, hint=_BLOCK_HINT)

  def apply(updates, params):
    del params
    return _clip_blocks(
      "clip_by_block_rms",
      updates,
      lambda x: None,
      threshold,
      divisor=lambda x: np.sqrt(max(x.size, 1)),
    )

  return with_stats(apply)


def clip_by_group_norm(
  max_norm: jax.typing.ArrayLike | Mapping[Hashable, jax.typing.ArrayLike],
  groups: Any,
) -> optax.GradientTransformation:
  """Global-norm clipping within each group of leaves.

  One huge tensor no longer starves the rest of the model: each group is
  scaled by ``min(1, bound / ||group||)`` on its own.

  Args:
    max_norm: one scalar bound for every group, or a mapping from label to a
      scalar bound.
    groups: a pytree of labels with the structure of the updates, or a
      callable mapping the params (the updates when no params are given) to
      such a tree, as in ``optax.multi_transform``.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ClipStats`
    whose ``norm``, ``scale`` and ``bound`` are dicts keyed by label.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> g = {"emb": jnp.array([30.0, 40.0]), "w": jnp.array([0.3, 0.4])}
    >>> tx = clipjax.clip_by_group_norm({"big": 1.0, "rest": 1.0},
    ...                                 {"emb": "big", "w": "rest"})
    >>> u, s = tx.update(g, None)
    >>> print(u["emb"], u["w"], s.norm["big"])
    [0.6 0.8] [0.3 0.4] 50.0
  """
  call = "clip_by_group_norm"
  if isinstance(max_norm, Mapping):
    for label, bound in max_norm.items():
      check_bound(call, f"max_norm[{label!r}]", bound)
  else:
    check_bound(
      call,
      "max_norm",
      max_norm,
      hint="It is one bound for every group, or a mapping from label to bound.",
    )

  def apply(updates, params):
    _norms.check_float_leaves(call, updates)
    labels_tree = (
      groups(updates if params is None else params) if callable(groups) else groups
    )
    leaves, treedef = jax.tree.flatten(updates)
    labels = treedef.flatten_up_to(labels_tree)  # type: ignore[attr-defined]
    by_label: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
      by_label.setdefault(label, []).append(i)
    if isinstance(max_norm, Mapping):
      missing = [lb for lb in by_label if lb not in max_norm]
      if missing:
        raise ValueError(
          f"{call}: no max_norm for group(s) {missing!r}; max_norm has"
          f" {sorted(map(repr, max_norm))}."
        )
    new: list[Any] = list(leaves)
    norms, scales, bounds = {}, {}, {}
    for label, idx in by_label.items():
      members = [leaves[i] for i in idx]
      bound = max_norm[label] if isinstance(max_norm, Mapping) else max_norm
      norm = _norms.block_norms(members, [None] * len(members), combine=True)[0]
      scale = _norms.clip_scale(norm, bound)
      for i in idx:
        new[i] = _norms.scale_leaf(leaves[i], scale)
      norms[label], scales[label], bounds[label] = norm, scale, bound
    stats = make_stats(
      call, norms, scales, bounds, fraction_true([s < 1 for s in scales.values()])
    )
    return jax.tree.unflatten(treedef, new), stats

  return with_stats(apply)


def unitwise_norm(x: jax.typing.ArrayLike, axis: _norms.Axes = None) -> jax.Array:
  """The L2 norm of each unit of ``x``, broadcast to ``x``'s shape.

  Same as ``optax.unitwise_norm``: with ``axis=None`` a unit is the whole array
  for rank <= 1 (after squeezing), a slice along axis 0 for rank 2 or 3 (dense
  and multi-head kernels), axes ``(0, 1, 2)`` for rank 4 (HWIO conv) and
  ``(0, 1, 2, 3)`` for rank 5. Half-precision input gives float32 norms.

  Args:
    x: the array.
    axis: the axes one unit spans, overriding the rank-based default.

  Returns:
    An array of ``x``'s shape holding each element's unit norm.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> print(clipjax.unitwise_norm(jnp.array([[3.0, 0.0], [4.0, 1.0]])))
    [[5. 1.]
     [5. 1.]]

  References:
    Brock et al., `High-Performance Large-Scale Image Recognition Without
    Normalization <https://arxiv.org/abs/2102.06171>`_, 2021.
  """
  x = jnp.asarray(x)
  axes = _norms.unit_axes(x, axis)
  norm = _norms.block_norms([x], [axes])[0]
  return jnp.broadcast_to(_norms.keepdims(norm, x, axes), x.shape)


def unitwise_clip(
  g_norm: jax.typing.ArrayLike,
  max_norm: jax.typing.ArrayLike,
  grad: jax.typing.ArrayLike,
  div_eps: jax.typing.ArrayLike = 1e-6,
) -> jax.Array:
  """Scales ``grad`` by ``max_norm / g_norm`` where ``g_norm >= max_norm``.

  Same as ``optax.unitwise_clip``: ``g_norm``, ``max_norm`` and ``grad`` have
  one shape, and ``div_eps`` keeps the division finite. The result has
  ``grad``'s dtype.

  Args:
    g_norm: each element's unit norm, as :func:`unitwise_norm` gives it.
    max_norm: each element's bound, of the same shape.
    grad: the array to clip.
    div_eps: the smallest ``g_norm`` divided by.

  Returns:
    ``grad`` with each element scaled by ``max_norm / max(g_norm, div_eps)``
    where ``g_norm >= max_norm``, and unchanged elsewhere.

  Raises:
    ValueError: if the three arrays do not have one shape.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> g = jnp.array([3.0, 4.0])
    >>> n = clipjax.unitwise_norm(g)
    >>> print(clipjax.unitwise_clip(n, jnp.full_like(n, 1.0), g))
    [0.6 0.8]

  References:
    Brock et al., `High-Performance Large-Scale Image Recognition Without
    Normalization <https://arxiv.org/abs/2102.06171>`_, 2021.
  """
  g_norm, max_norm, grad = map(jnp.asarray, (g_norm, max_norm, grad))
  if not g_norm.shape == max_norm.shape == grad.shape:
    raise ValueError(
      "unitwise_clip: g_norm, max_norm and grad must have one shape; got"
      f" {g_norm.shape}, {max_norm.shape} and {grad.shape}."
    )
  acc = jnp.promote_types(_norms.accumulation_dtype(grad.dtype), g_norm.dtype)
  g_norm, max_norm = g_norm.astype(acc), max_norm.astype(acc)
  factor = max_norm / jnp.maximum(g_norm, jnp.asarray(div_eps, acc))
  scale = jnp.where(g_norm < max_norm, jnp.ones_like(factor), factor)
  return _norms.scale_leaf(grad, scale)


def adaptive_grad_clip(
  clipping: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike = 1e-3,
  axis: _norms.Axes = None,
) -> optax.GradientTransformation:
  """Clips each unit's update to at most ``clipping * max(||w_unit||, eps)``.

  Adaptive gradient clipping (AGC). Drop-in for ``optax.adaptive_grad_clip``,
  with units as in :func:`unitwise_norm`, and norms accumulated in float32.

  Args:
    clipping: the largest ratio of a unit's update norm to its parameter norm.
    eps: the smallest parameter norm used, so that zero-initialised parameters
      can still move.
    axis: the axes one unit spans, overriding the rank-based default.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ClipStats`
    with one norm, scale and bound per unit. ``update`` raises ``ValueError``
    without params.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.adaptive_grad_clip(0.1)
    >>> w = jnp.array([[3.0, 1.0], [4.0, 0.0]])
    >>> g = jnp.array([[1.0, 0.01], [0.0, 0.0]])
    >>> u, s = tx.update(g, tx.init(w), w)
    >>> print(u)
    [[0.5  0.01]
     [0.   0.  ]]

  References:
    Brock et al., `High-Performance Large-Scale Image Recognition Without
    Normalization <https://arxiv.org/abs/2102.06171>`_, 2021.
  """
  call = "adaptive_grad_clip"
  check_bound(call, "clipping", clipping)
  check_bound(call, "eps", eps)

  def apply(updates, params):
    require_params(call, params)
    p_leaves = jax.tree.structure(updates).flatten_up_to(params)  # type: ignore[attr-defined]
    flat = jax.tree_util.tree_flatten_with_path(updates)[0]
    for (path, u), p in zip(flat, p_leaves, strict=True):
      if np.shape(p) != np.shape(u):
        raise ValueError(
          f"{call}: the params must have the updates' shapes; leaf"
          f" {jax.tree_util.keystr(path) or '(the only one)'} has shape"
          f" {np.shape(u)} in the updates and {np.shape(p)} in the params."
        )

    def bound_of(p_norms):
      return clipping * jnp.maximum(p_norms, jnp.asarray(eps, p_norms.dtype))

    return _clip_blocks(
      call,
      updates,
      lambda x: _norms.unit_axes(x, axis),
      None,
      bound_of=bound_of,
      companions=p_leaves,
    )

  return with_stats(apply)

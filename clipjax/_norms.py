"""Kernels shared by every clipper: norms per scope, safe scale factors, scaling.

Three rules hold here so that every clipper inherits them:

- norms accumulate in float32 (float64 for float64 input), and a sum of squares
  that overflows even there is recomputed from squares scaled by a power of
  two, so a finite tree always has a finite norm unless the norm itself
  exceeds the accumulation dtype's range;
- the scale factor ``min(1, bound / norm)`` is exactly 1 when the norm does not
  exceed the bound, so a zero norm never produces NaN, also for a zero bound;
- each leaf keeps its dtype; half-precision leaves are scaled in float32 and
  rounded once.

This module imports nothing else of clipjax but ``_layout`` (the static
layout of a tree, which imports nothing).
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clipjax._layout import Layout

Axes = int | tuple[int, ...] | None
AxisSpec = Axes | Callable[[jax.Array], Axes]


def accumulation_dtype(dtype: Any) -> np.dtype:
  """The dtype norms of ``dtype`` arrays are accumulated in.

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipjax._norms import accumulation_dtype
    >>> accumulation_dtype(jnp.bfloat16)
    dtype('float32')
  """
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.inexact) and jnp.finfo(dtype).bits >= 64:
    return jnp.dtype(jnp.float64)
  return jnp.dtype(jnp.float32)


def widest_accumulation_dtype(leaves: Sequence[jax.Array]) -> np.dtype:
  """float64 if any leaf accumulates in float64, else float32."""
  wide = np.dtype(np.float64)
  if any(accumulation_dtype(x.dtype) == wide for x in leaves):
    return wide
  return np.dtype(np.float32)


def check_float_leaves(
  call: str,
  tree: Any,
  *,
  real: bool = False,
  why: str = (
    "clipping needs floating-point updates (cast integer leaves, or mask them"
    " out with optax.masked)"
  ),
) -> None:
  """Raises ``TypeError`` naming ``call``, the leaf and ``why`` for a non-float leaf.

  Complex leaves pass unless ``real``.
  """
  kind = jnp.floating if real else jnp.inexact
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, kind):
      where = jax.tree_util.keystr(path) or "the update"
      raise TypeError(f"{call}: leaf {where} has dtype {dtype}; {why}.")


def _pow2_factors(m: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Powers of two that scale ``m`` into ``[0.5, 1)`` and back, each one normal.

  Returns ``(down1, down2, up1, up2)`` with ``m * down1 * down2`` in
  ``[0.5, 1)`` and ``up1 * up2`` the inverse. Dividing by ``m`` itself is
  compiled as a multiply by ``1 / m``, which is subnormal, hence flushed to 0
  on CPUs, once ``m`` exceeds ``2**126``; two normal factors never are. Zero,
  infinite and NaN ``m`` give factors of 1.
  """
  _, e = jnp.frexp(jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m)))
  half = e // 2
  one = jnp.ones_like(m)
  return (
    jnp.ldexp(one, -half),
    jnp.ldexp(one, half - e),
    jnp.ldexp(one, half),
    jnp.ldexp(one, e - half),
  )


def _squares(x: jax.Array, acc: np.dtype, factor: Any = None) -> jax.Array:
  """|x|**2 elementwise in ``acc``, optionally of ``x * factor``."""
  parts = (jnp.real(x), jnp.imag(x)) if jnp.iscomplexobj(x) else (x,)
  total = None
  for part in parts:
    part = part.astype(acc)
    if factor is not None:
      part = part * factor
    total = jnp.square(part) if total is None else total + jnp.square(part)
  assert total is not None
  return total


def _shift(acc: np.dtype) -> int:
  """``k`` such that a sum of ``2**32`` terms ``(x * 2**-k)**2`` is finite in ``acc``.

  For every finite ``x``: half the largest exponent, plus 16. 80 for float32,
  528 for float64.
  """
  return int(jnp.finfo(acc).maxexp) // 2 + 16


def combine_norms(norms: Sequence[jax.Array] | jax.Array) -> jax.Array:
  """sqrt(sum(n**2)) over same-shape norms (a sequence, or stacked along axis 0).

  Computed from the norms scaled by a power of two near their largest, so it
  does not overflow.
  """
  stacked = norms if isinstance(norms, jax.Array) else jnp.stack(list(norms))
  m = jnp.max(stacked, axis=0)
  down1, down2, up1, up2 = _pow2_factors(m)
  scaled = jnp.sqrt(jnp.sum(jnp.square(stacked * down1 * down2), axis=0))
  return jnp.where(jnp.isposinf(m), m, scaled * up1 * up2)


def _magnitudes(x: jax.Array, acc: np.dtype) -> jax.Array:
  """``x`` flattened in ``acc``: its entries, or for complex ``x`` its moduli."""
  if jnp.iscomplexobj(x):
    return jnp.abs(x).astype(acc).reshape(-1)
  return x.astype(acc).reshape(-1)


def block_shape(x: Any, axes: Axes) -> tuple[int, ...]:
  """The shape of ``x``'s block norms: ``x``'s shape without ``axes``."""
  if axes is None:
    return ()
  dims = (axes,) if isinstance(axes, int) else axes
  return tuple(int(d) for i, d in enumerate(np.shape(x)) if i not in dims)


def block_layout(leaves: Sequence[Any], axes: Sequence[Axes], treedef: Any) -> Layout:
  """The static :class:`Layout` of the leaves' block norms.

  One group per block shape and accumulation dtype: a tree's per-leaf norms
  (scalars) are one group, per-unit norms one group per unit shape, so that
  statistics stacked by it (``layout.stack``) are a few vectors however many
  leaves there are. ``treedef`` (the leaves' structure) makes
  :meth:`Stacked.tree` read them as a tree like the leaves.
  """
  structs = [
    jax.ShapeDtypeStruct(block_shape(x, a), accumulation_dtype(jnp.result_type(x)))
    for x, a in zip(leaves, axes, strict=True)
  ]
  return Layout.of(jax.tree.unflatten(treedef, structs), keep_empty=True)


def _scaled_norm(x: jax.Array, axes: Axes, acc: np.dtype, down: Any) -> jax.Array:
  """Block norms computed as ``sqrt(sum((x * 2**-k)**2)) * 2**k`` (:func:`_shift`).

  The overflow path of :func:`block_norms`: the scaled squares cannot
  overflow, and what they lose to underflow (elements below ``2**17`` for
  float32) weighs nothing beside a sum that overflowed. ``down`` is
  ``2**-k`` from :func:`_down`.
  """
  scaled = jnp.sqrt(jnp.sum(_squares(x, acc, down), axis=axes))
  return scaled * np.asarray(2.0 ** _shift(acc), acc)


def _down(accs: Sequence[np.dtype]) -> dict[np.dtype, jax.Array]:
  """``2**-k`` (:func:`_shift`) for each accumulation dtype, behind a barrier.

  Behind a barrier, the factor is no constant that XLA could fold into
  ``(x * f)**2 = x**2 * f**2``, where ``f**2`` underflows to 0 and ``x**2``
  overflows. One barrier per dtype, not per leaf.
  """
  return {
    acc: lax.optimization_barrier(jnp.asarray(2.0 ** -_shift(acc), acc))
    for acc in dict.fromkeys(accs)
  }


def block_norms(
  leaves: Sequence[jax.Array], axes: Sequence[Axes], *, combine: bool = False
) -> list[jax.Array]:
  """L2 norms of the blocks of each leaf: ``leaf`` reduced over ``axes[i]``.

  Each block's sum of squares is one plain reduction (as fast as optax's).
  If any overflows (one flag over all of them), one ``lax.cond`` recomputes
  the norms from squares scaled by ``2**-k`` (:func:`_scaled_norm`), keeping
  the plain norm of every block whose sum was finite; for a global norm,
  over one concatenated vector.

  The norms stay per leaf, so that a caller computes each leaf's scale
  factor from its own norm, which XLA fuses with the scaling as it does
  optax's. A vector of per-leaf values sliced back into every leaf (or a
  rarely taken branch that computes the leaves stacked and slices them
  apart) costs XLA:CPU a kernel per leaf, several times optax's compile time
  on a tree of hundreds of leaves: statistics stack the per-leaf results
  instead, as outputs.

  Args:
    leaves: the arrays.
    axes: for each leaf, the axes that one block spans (``None``: the whole
      leaf).
    combine: if true, return a single norm over all leaves together (the
      blocks of every leaf must then have the same shape, e.g. scalars for a
      global norm, or ``(B,)`` for per-example norms).

  Returns:
    A list of norms in each leaf's accumulation dtype (one entry if
    ``combine``).
  """
  if not leaves:
    return [jnp.zeros((), jnp.float32)] if combine else []
  axes = [
    normalize_axes("block_norms", x, a) for x, a in zip(leaves, axes, strict=True)
  ]
  accs = [accumulation_dtype(x.dtype) for x in leaves]
  wide = widest_accumulation_dtype(leaves)
  if combine and all(a is None for a in axes):
    return [_global_norm(leaves, accs, wide)]
  sums = [
    jnp.sum(_squares(x, acc), axis=a)
    for x, a, acc in zip(leaves, axes, accs, strict=True)
  ]

  def plain(sums):
    # Compiled, XLA would rewrite sqrt(x * x) of a one-element block as |x|,
    # which differs from the eager result where x * x underflows; the barrier
    # keeps jit and eager alike.
    return [jnp.sqrt(s) for s in lax.optimization_barrier(sums)]

  def rescaled(sums):
    down = _down(accs)
    return [
      lax.select(lax.is_finite(s), lax.sqrt(s), _scaled_norm(x, a, acc, down[acc]))
      for s, x, a, acc in zip(sums, leaves, axes, accs, strict=True)
    ]

  if not combine:
    # One flag over every sum at once: a concatenation and one reduction.
    every = jnp.concatenate([s.reshape(-1).astype(wide) for s in sums])
    return lax.cond(jnp.any(jnp.isposinf(every)), rescaled, plain, sums)
  # Per-example norms: the blocks of every leaf together.
  total = jnp.sum(jnp.stack([s.astype(wide) for s in sums]), axis=0)

  def combined_plain(total):
    return jnp.sqrt(lax.optimization_barrier(total))

  def combined_rescaled(total):
    rows = leaves[0].shape[0] if leaves[0].ndim else 0
    per_example = rows > 0 and all(
      x.ndim and x.shape[0] == rows and a == tuple(range(1, x.ndim))
      for x, a in zip(leaves, axes, strict=True)
    )
    if per_example:
      # Per-example norms (every axis but the batch): the leaves as one
      # (batch, elements) matrix, one reduction, cheap to compile.
      flat = jnp.concatenate(
        [_magnitudes(x, wide).reshape(rows, -1) for x in leaves], axis=1
      )
      scaled = _scaled_norm(flat, (1,), wide, _down([wide])[wide])
      # The examples whose sum did not overflow keep their plain norm.
      return lax.select(lax.is_finite(total), lax.sqrt(total), scaled)
    return combine_norms([n.astype(wide) for n in rescaled(sums)])

  overflow = jnp.any(jnp.isposinf(total))
  return [lax.cond(overflow, combined_rescaled, combined_plain, total)]


def _global_norm(
  leaves: Sequence[jax.Array], accs: Sequence[np.dtype], wide: np.dtype
) -> jax.Array:
  """The norm of all leaves together; its overflow path is one flat vector."""
  sums = [
    jnp.sum(_squares(x, acc)).astype(wide) for x, acc in zip(leaves, accs, strict=True)
  ]
  # Stacked and summed at once: one op however many leaves there are.
  total = jnp.sum(jnp.stack(sums))

  def plain(total):
    return jnp.sqrt(lax.optimization_barrier(total))

  def rescaled(total):
    # One vector of every element: one reduction, cheap to compile.
    flat = jnp.concatenate([_magnitudes(x, wide) for x in leaves])
    return _scaled_norm(flat, None, wide, _down([wide])[wide])

  return lax.cond(jnp.isposinf(total), rescaled, plain, total)


def mesh_axes(axis_name: Any) -> tuple[Any, ...]:
  """``axis_name`` as a tuple of mesh axis names (one name, or a tuple/list)."""
  if isinstance(axis_name, tuple | list):
    return tuple(axis_name)
  return (axis_name,)


def varying_axes(x: Any) -> frozenset:
  """The mesh axes ``x`` varies over, as ``jax.typeof(x)`` records inside shard_map."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)  # JAX 0.10
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", ()))  # JAX 0.7-0.9


def tracks_varying(axis_name: Any) -> bool:
  """Whether JAX records here which values vary over every axis of ``axis_name``.

  True inside ``jax.shard_map`` (its default ``check_vma=True``); false under
  ``pmap`` and ``shard_map(..., check_vma=False)``, where every value reads as
  the same on every device. The device index varies over an axis by
  definition, so it is the probe.
  """
  return all(a in varying_axes(lax.axis_index(a)) for a in mesh_axes(axis_name))


def already_summed(call: str, where: str, axis_name: Any, hint: str = "") -> ValueError:
  """The error for a gradient that is the same on every device of ``axis_name``."""
  return ValueError(
    f"{call}(axis_name={axis_name!r}): {where} is the same on every device along"
    f" {axis_name!r} (jax.typeof records no variation over it). That is what"
    " jax.grad returns for parameters that enter shard_map replicated"
    " (in_specs=P()): JAX has already summed the gradient over the devices, by a"
    " dense all-reduce. Before jax.grad, mark the parameters as per-device:"
    f" params = jax.lax.pcast(params, {axis_name!r}, to='varying'), or pass them"
    f" with a device axis (in_specs=P({axis_name!r})).{hint}"
  )


def _psum_norm(local: jax.Array, axes: tuple[Any, ...]) -> jax.Array:
  """``sqrt(psum(local**2))`` over ``axes``, rescaled by ``pmax``: no overflow."""
  peak = lax.pmax(local, axes)
  safe = jnp.where(peak > 0, peak, jnp.ones_like(peak))
  total = lax.psum(jnp.square(local / safe), axes)
  return jnp.where(peak > 0, peak * jnp.sqrt(total), peak)


def sharded_global_norm(call: str, tree: Any, axis_name: Any) -> jax.Array:
  """The global norm of a tree whose leaves may be sharded over ``axis_name``.

  Each leaf counts once in the whole tree's norm: a leaf that varies over an
  axis holds one shard per device along it, so its squares are summed over
  that axis; a leaf that is the same on every device along an axis (a
  replicated bias in a tensor-parallel tree) is counted once, not once per
  device. Where JAX records no varying axes (``pmap``,
  ``shard_map(check_vma=False)``) every leaf is taken as sharded over all of
  ``axis_name``. A tree of which no leaf varies is an error
  (:func:`already_summed`): a gradient replicated everywhere was summed by
  ``jax.grad``, and a replicated tree needs no ``axis_name``.
  """
  axes = mesh_axes(axis_name)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  tracked = tracks_varying(axes)
  groups: dict[tuple[Any, ...], list[jax.Array]] = {}
  for _, x in flat:
    over = tuple(a for a in axes if a in varying_axes(x)) if tracked else axes
    groups.setdefault(over, []).append(x)
  if tracked and flat and set(groups) == {()}:
    first = jax.tree_util.keystr(flat[0][0]) or "the tree itself"
    where = f"every leaf of the tree (the first: {first})"
    hint = " A tree replicated on purpose has its local norm: drop axis_name."
    raise already_summed(call, where, axis_name, hint)
  if not flat:
    return block_norms([], [], combine=True)[0]
  wide = widest_accumulation_dtype([x for _, x in flat])
  parts = []
  for over, xs in groups.items():
    local = block_norms(xs, [None] * len(xs), combine=True)[0].astype(wide)
    parts.append(_psum_norm(local, over) if over else local)
  return parts[0] if len(parts) == 1 else combine_norms(parts)


def global_norm(tree: Any, *, axis_name: Any = None) -> jax.Array:
  """The L2 norm of all leaves of ``tree`` together, overflow-safe.

  With ``axis_name`` (inside ``shard_map``), the tree is sharded over that
  mesh axis (or tuple of axes) and the result is the norm of the whole tree:
  ``sqrt(psum(local^2))`` for the leaves that vary over the axis (one shard
  per device), computed rescaled by the largest local norm (``pmax``) so that
  it cannot overflow either, and each replicated leaf (the same on every
  device, as ``jax.typeof`` records inside ``shard_map``) counted once. Under
  ``pmap`` or ``shard_map(check_vma=False)``, where JAX records no such
  thing, every leaf is taken as sharded. A tree that is replicated
  everywhere raises ``ValueError``: as a gradient, it was already summed over
  the devices by ``jax.grad`` (see the message for the fix).

  Args:
    tree: a pytree of arrays; an empty tree has norm 0.
    axis_name: the mesh axis the tree is sharded over, or ``None`` for the
      local norm.

  Returns:
    A scalar in the leaves' widest accumulation dtype: float32, or float64 if
    a leaf is float64.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> print(clipjax.global_norm({"a": jnp.array([3.0]), "b": jnp.array([4.0])}))
    5.0
    >>> big = {"a": jnp.full((4,), 6e4, jnp.float16)}  # float16's max is 65504
    >>> print(clipjax.global_norm(big))
    120000.0

    A tree with a sharded kernel and a replicated bias, on 8 devices:

    >>> import jax, numpy as np
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:8]), ("model",))
    >>> tree = {"w": jnp.ones((8, 2)), "b": jnp.full((3,), 2.0)}
    >>> norm = jax.jit(jax.shard_map(
    ...   lambda t: clipjax.global_norm(t, axis_name="model"), mesh=mesh,
    ...   in_specs=({"w": P("model"), "b": P()},), out_specs=P()))(tree)
    >>> print(norm, clipjax.global_norm(tree))  # sqrt(16 + 12) both ways
    5.2915025 5.2915025
  """
  if axis_name is not None:
    return sharded_global_norm("global_norm", tree, axis_name)
  leaves = jax.tree.leaves(tree)
  return block_norms(leaves, [None] * len(leaves), combine=True)[0]


def _max_and_sum(a, b):
  # Module level, so that lax.reduce's traced reducer is cached across leaves.
  return lax.max(a[0], b[0]), lax.add(a[1], b[1])


def _reduce_peak_and_count(x: jax.Array, bound: Any, rows_first: bool, axes: tuple):
  acc = accumulation_dtype(x.dtype)
  mag = lax.abs(x)
  over = lax.convert_element_type(lax.gt(mag, _like(bound, mag)), jnp.int32)
  init = (np.zeros((), acc), np.zeros((), np.int32))
  operands = (lax.convert_element_type(mag, acc), over)
  if not rows_first:
    return lax.reduce(operands, init, _max_and_sum, axes)
  # Rows first, then the row results: XLA:CPU splits a reduction to a vector
  # across its threads, but runs a reduction to a scalar on one.
  as_rows = tuple(o.reshape(x.shape[0], -1) for o in operands)
  rows = lax.reduce(as_rows, init, _max_and_sum, (1,))
  return lax.reduce(rows, init, _max_and_sum, (0,))


def peak_and_count(x: jax.Array, bound: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``max(|x|)`` and the number of elements with ``|x| > bound``, in one pass.

  Both come from one variadic reduction, which XLA fuses with ``|x|`` and the
  comparison into a single loop over ``x``. As two reductions, XLA:CPU reads
  ``x`` twice and first writes ``|x|`` and the 0/1 mask to memory, which made
  ``clip`` several times slower than ``optax.clip``. The maximum is taken in
  the accumulation dtype (exact either way) because CPUs emulate bfloat16.

  Returns:
    The peak in ``x``'s accumulation dtype, and the count as int32 (float32
    for leaves of 2**31 elements or more, counted in a second pass).

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipjax._norms import peak_and_count
    >>> peak, count = peak_and_count(jnp.array([-3.0, 0.5, 2.0]), jnp.array(1.0))
    >>> print(peak, count)
    3.0 2
  """
  if x.size >= 2**31:
    acc = accumulation_dtype(x.dtype)
    mag = jnp.abs(x)
    return jnp.max(mag, initial=0).astype(acc), jnp.sum(mag > bound, dtype=jnp.float32)
  rows_first = x.ndim >= 2 and x.size > 0
  return _reduce_peak_and_count(x, bound, rows_first, tuple(range(x.ndim)))


# Leaves of at most this many elements are stacked by shape and dtype for
# peaks_and_counts: one reduction per group instead of one per leaf. Copying
# them costs little; copying large leaves would cost a whole extra pass.
SMALL_LEAF = 1 << 16


def peaks_and_counts(
  leaves: Sequence[jax.Array], bounds: Sequence[Any]
) -> list[tuple[tuple[int, ...], jax.Array, jax.Array]]:
  """:func:`peak_and_count` of every leaf, small leaves stacked by group.

  ``bounds[i]`` bounds leaf ``i`` (a scalar, or an array that broadcasts to
  its shape) and must be the same for leaves of one shape and dtype. Leaves
  of equal shape and dtype with at most ``SMALL_LEAF`` elements go through one
  variadic reduction over their stack, so that a transformer's hundreds of
  small leaves (biases, norm scales, the kernels of narrow models) make about
  ten reductions, not hundreds, for XLA to compile; each leaf's result is
  exactly its own.

  Returns:
    Pieces ``(indices, peaks, counts)`` that cover every leaf once: the
    leaves' indices and their peaks (accumulation dtype) and counts (int32;
    float32 for a leaf of 2**31 elements or more), as vectors. Read them in
    leaf order with :func:`in_leaf_order`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipjax._norms import in_leaf_order, peaks_and_counts
    >>> xs = [jnp.array([-3.0, 0.5]), jnp.ones((2, 2)), jnp.array([0.25, 2.0])]
    >>> pieces = peaks_and_counts(xs, [jnp.array(1.0)] * 3)
    >>> [idx for idx, _, _ in pieces]
    [(0, 2), (1,)]
    >>> print(in_leaf_order([(i, p) for i, p, _ in pieces], range(3)))
    [3. 1. 2.]
  """
  pieces: list[tuple[tuple[int, ...], jax.Array, jax.Array]] = []
  for idx in Layout.of(list(leaves), keep_empty=True).groups:
    x = leaves[idx[0]]
    if len(idx) == 1 or x.size > SMALL_LEAF:
      for i in idx:
        peak, count = peak_and_count(leaves[i], bounds[i])
        pieces.append(((i,), peak.reshape(1), count.reshape(1)))
      continue
    stack = jnp.stack([leaves[i] for i in idx])
    axes = tuple(range(1, stack.ndim))
    peak, count = _reduce_peak_and_count(stack, bounds[idx[0]], False, axes)
    pieces.append((idx, peak, count))
  return pieces


def in_leaf_order(pieces: Sequence[tuple[tuple[int, ...], Any]], order: Any) -> Any:
  """The values of the leaves in ``order``, one vector, from per-piece vectors.

  ``pieces`` hold ``(indices, values)``: a vector of values for those leaves.
  One concatenation and, unless the pieces are in order already, one gather
  by a constant permutation, however many leaves there are.
  """
  order = list(order)
  wanted = set(order)
  used = [(idx, v) for idx, v in pieces if wanted.intersection(idx)]
  at = {i: n for n, i in enumerate(i for idx, _ in used for i in idx)}
  values = [v for _, v in used]
  joined = values[0] if len(values) == 1 else jnp.concatenate(values)
  perm = [at[i] for i in order]
  if perm == list(range(joined.shape[0])):
    return joined
  return jnp.take(joined, np.asarray(perm, np.int32), unique_indices=True)


def normalize_axes(call: str, x: jax.Array, axis: AxisSpec) -> Axes:
  """Resolves ``axis`` (None, an int, a tuple, or a callable of the leaf)."""
  resolved = axis(x) if callable(axis) else axis
  if resolved is None:
    return None
  ax = (resolved,) if isinstance(resolved, int) else tuple(resolved)
  ndim = x.ndim
  if any(not -ndim <= a < ndim for a in ax):
    raise ValueError(
      f"{call}: axis={resolved!r} is out of range for a leaf of shape {x.shape}."
    )
  return tuple(sorted(a % ndim for a in ax))


def unit_axes(x: jax.Array, axis: Axes = None) -> Axes:
  """The axes one unit spans, with optax's ``unitwise_norm`` conventions.

  Rank <= 1 (after squeezing): the whole array; rank 2 or 3: axis 0 (inputs of a
  dense or multi-head kernel); rank 4: ``(0, 1, 2)`` (HWIO conv); rank 5:
  ``(0, 1, 2, 3)`` (DHWIO conv).
  """
  if axis is not None:
    return normalize_axes("unitwise_norm", x, axis)
  shape = np.shape(x)
  if sum(d != 1 for d in shape) <= 1:
    return None
  rank = len(shape)
  if rank in (2, 3):
    return (0,)
  if rank == 4:
    return (0, 1, 2)
  if rank == 5:
    return (0, 1, 2, 3)
  raise ValueError(
    f"Expected parameter with shape in {1, 2, 3, 4, 5}, got {shape}. "
    "Use axis parameter to specify reduction axes for other shapes."
  )


def keepdims(norm: jax.Array, x: jax.Array, axes: Axes) -> jax.Array:
  """Reshapes a block norm so that it broadcasts against ``x``."""
  if axes is None:
    return norm.reshape((1,) * x.ndim)
  return jnp.expand_dims(norm, axes)


def clip_scale(
  norm: jax.Array, bound: Any, eps: Any = 0.0, *, checked: bool = False
) -> jax.Array:
  """``min(1, bound / (norm + eps))``, exactly 1 whenever ``norm + eps <= bound``.

  A zero norm therefore gives 1, never NaN, also for a zero bound. A traced bound
  that is negative or NaN acts as 0: a broken schedule zeroes the update rather
  than flipping its sign or letting it through unclipped. ``checked`` says
  that ``bound`` came from :func:`safe_bound` already.

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipjax._norms import clip_scale
    >>> print(clip_scale(jnp.array([0.0, 0.5, 4.0]), 2.0))
    [1.  1.  0.5]
    >>> print(clip_scale(jnp.array(0.0), 0.0))
    1.0
  """
  if checked and jnp.result_type(bound) != norm.dtype:
    bound = bound.astype(norm.dtype)
  elif not checked:
    bound = safe_bound(bound, norm.dtype)
  denom = norm
  if not (_is_concrete(eps) and np.all(np.asarray(eps) == 0)):
    denom = norm + jnp.asarray(eps).astype(norm.dtype)
  bound = _like(bound, denom)
  over = lax.gt(denom, bound)
  one = lax.full_like(denom, 1)
  return lax.select(over, lax.div(bound, lax.select(over, denom, one)), one)


def _like(x: Any, like: jax.Array) -> Any:
  """``x`` in ``like``'s dtype, broadcast (numpy-style) to its shape.

  For ``lax`` ops, which neither promote nor broadcast: a per-leaf clipper
  calls them hundreds of times, and ``jnp.where`` traces a nested ``jit``
  each time.
  """
  x = x.astype(like.dtype) if hasattr(x, "astype") else np.asarray(x, like.dtype)
  if np.shape(x) == like.shape:
    return x
  rank = np.ndim(x)
  dims = tuple(range(like.ndim - rank, like.ndim))
  return lax.broadcast_in_dim(x, like.shape, dims)


def _is_concrete(x: Any) -> bool:
  return isinstance(x, int | float | np.ndarray | np.generic)


def safe_bound(bound: Any, dtype: Any) -> Any:
  """``bound`` in ``dtype``, with negative or NaN entries as 0 (see :func:`clip_scale`).

  A concrete bound is converted by numpy, adding nothing to the traced
  program, so that a per-leaf clipper costs a few ops per leaf.
  """
  if _is_concrete(bound):
    value = np.asarray(bound, dtype)
    return np.where(value >= 0, value, np.zeros((), dtype))
  traced = jnp.asarray(bound).astype(dtype)
  zero = _like(0, traced)
  return lax.select(lax.ge(traced, zero), traced, zero)


def scale_leaf(x: jax.Array, scale: jax.Array) -> jax.Array:
  """``x * scale`` in ``x``'s dtype; half precision is scaled in float32."""
  if jnp.iscomplexobj(x):
    return x * scale.astype(x.dtype)
  acc = accumulation_dtype(x.dtype)
  if x.dtype == acc:
    return x * scale.astype(acc)
  return (x.astype(acc) * scale.astype(acc)).astype(x.dtype)


def scale_tree(tree: Any, scale: jax.Array) -> Any:
  """Multiplies every leaf of ``tree`` by the scalar ``scale``, keeping dtypes."""
  return jax.tree.map(lambda x: scale_leaf(x, scale), tree)

"""The layout of a tree as the kernels see it: leaves of one shape and dtype, stacked.

A transformer's hundreds of leaves have about ten distinct shapes. Running a
per-leaf kernel once per *group* of equal leaves, under ``jax.vmap`` over the
stacked group, makes the traced program (and so compile time and per-step host
time) grow with the number of shapes, not of leaves, while each leaf's
semantics stay exactly what they are: vmap computes every leaf's own result.

:class:`Layout` is static (hashable, no arrays): the tree structure, each
leaf's shape and dtype, and which leaves form each group. :class:`Stacked`
holds one array tree per group, stacked along a new leading axis, with its
layout as static pytree metadata, so that a state built of it checkpoints,
jits and vmaps like any other and still reads as a tree like the updates.

This module imports nothing else of clipjax.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which leaves of a tree are stacked together (static).

  Attributes:
    treedef: the tree's structure.
    shapes: each leaf's shape, in ``jax.tree.leaves`` order.
    dtypes: each leaf's dtype (as a string, so the layout is hashable).
    groups: for each group, the indices of its leaves: the non-empty leaves
      of one shape and dtype, in order of first appearance. Empty leaves
      belong to no group (unless the layout was made with ``keep_empty``).
  """

  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[str, ...]
  groups: tuple[tuple[int, ...], ...]

  @staticmethod
  def of(tree: Any, *, keep_empty: bool = False) -> "Layout":
    """The layout of ``tree`` (arrays or ``jax.ShapeDtypeStruct``s).

    Empty leaves join no group unless ``keep_empty`` (kernels cannot run on
    them; a stacked ``(k, 0)`` vector of statistics can hold them).

    Examples:
      >>> import jax.numpy as jnp
      >>> from clipjax._layout import Layout
      >>> tree = {"a": jnp.ones(3), "b": jnp.ones((2, 2)), "c": jnp.zeros(3)}
      >>> Layout.of(tree).groups
      ((0, 2), (1,))
    """
    leaves, treedef = jax.tree.flatten(tree)
    shapes = tuple(tuple(int(d) for d in np.shape(x)) for x in leaves)
    dtypes = tuple(str(jnp.result_type(x)) for x in leaves)
    by_key: dict[tuple[Any, str], list[int]] = {}
    for i, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=True)):
      if keep_empty or int(np.prod(shape, dtype=np.int64)) > 0:
        by_key.setdefault((shape, dtype), []).append(i)
    groups = tuple(tuple(idx) for idx in by_key.values())
    return Layout(treedef, shapes, dtypes, groups)

  @property
  def names(self) -> tuple[str, ...]:
    """Each leaf's path as ``jax.tree_util.keystr`` writes it."""
    dummy = jax.tree.unflatten(self.treedef, list(range(len(self.shapes))))
    return tuple(
      jax.tree_util.keystr(path)
      for path, _ in jax.tree_util.tree_flatten_with_path(dummy)[0]
    )

  def group_shape(self, g: int) -> tuple[int, ...]:
    return self.shapes[self.groups[g][0]]

  def group_dtype(self, g: int) -> np.dtype:
    return np.dtype(jnp.dtype(self.dtypes[self.groups[g][0]]))

  def stack(self, leaves: Sequence[jax.Array]) -> list[jax.Array]:
    """One array per group, its leaves stacked along a new leading axis."""
    out = []
    for idx in self.groups:
      if len(idx) == 1:
        out.append(jnp.expand_dims(leaves[idx[0]], 0))
      else:
        out.append(jnp.stack([leaves[i] for i in idx]))
    return out

  def unstack(
    self,
    stacked: Sequence[Any],
    fill: Sequence[Any],
    ranks: Sequence[Any] = (),
    rows: Sequence[Sequence[Any]] = (),
  ) -> list[Any]:
    """Per-leaf values from per-group stacked trees; ``fill[i]`` for empty leaves.

    ``ranks[g]`` holds the per-leaf rank of each array of group ``g``'s tree
    (in ``jax.tree.leaves`` order), so that the group axis is found even below
    leading axes added since (a device axis, a vmapped batch of models);
    without it, the group axis is axis 0. ``rows[g][j]``, if given, is a
    traced index to read leaf ``j`` of group ``g`` at instead of ``j``: a
    constant offset makes the kernel reading each leaf distinct, so XLA:CPU
    compiles one per leaf; a runtime index keeps one per group.
    """
    out = list(fill)
    for g, (idx, tree) in enumerate(zip(self.groups, stacked, strict=True)):
      arrays, treedef = jax.tree.flatten(tree)
      rank = ranks[g] if ranks else tuple(np.ndim(a) - 1 for a in arrays)
      axes = [np.ndim(a) - r - 1 for a, r in zip(arrays, rank, strict=True)]
      for j, i in enumerate(idx):
        at = rows[g][j] if rows and len(idx) > 1 else j
        leaf = [_row(a, at, ax) for a, ax in zip(arrays, axes, strict=True)]
        out[i] = jax.tree.unflatten(treedef, leaf)
    return out


def _row(a: Any, j: Any, axis: int) -> Any:
  """Row ``j`` (static, or a traced index) along ``axis``; for a
  ``jax.ShapeDtypeStruct``, its shape."""
  if isinstance(a, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(a.shape[:axis] + a.shape[axis + 1 :], a.dtype)
  if isinstance(j, int):
    return jnp.take(a, j, axis=axis)
  return jax.lax.dynamic_index_in_dim(a, j, axis, keepdims=False)


@dataclasses.dataclass(frozen=True)
class Stacked:
  """Per-leaf values held as one stacked array (or tree) per group of leaves.

  A registered pytree: its children are the groups' trees (each with a leading
  axis over the group's leaves), its layout (which leaves form each group,
  the tree's structure) is static metadata. Indexing and :meth:`tree` read it
  as a tree like the updates, so that ``state.feedback["w"]`` is leaf ``w``'s
  residual and ``stats.norm["w"]`` leaf ``w``'s norm. Clipjax's states hold
  per-leaf values so (a per-leaf clipper's statistics, one vector per shape
  of block; a compressor's state, one array per shape of leaf), so that the
  number of state arrays does not grow with the number of leaves.

  Attributes:
    groups: one tree per group of ``layout``, stacked along axis 0.
    layout: the groups (static).
    ranks: for each group, the per-leaf rank of each of its arrays (static),
      so that a leading axis added outside (``s[None]`` for a per-device
      state, a ``jax.vmap`` over models) does not hide the group axis.

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4])}
    >>> _, stats = clipjax.clip_by_norm(1.0).update(g, None)
    >>> print(stats.norm["a"], [x.shape for x in stats.norm.groups])
    5.0 [(2,)]
    >>> stats.norm.tree()
    {'a': Array(5., dtype=float32), 'b': Array(0.5, dtype=float32)}
  """

  groups: list[Any]
  layout: Layout
  ranks: tuple[Any, ...] = ()

  @staticmethod
  def of(groups: list[Any], layout: Layout) -> "Stacked":
    """Stacked groups that remember each array's per-leaf rank (static)."""
    ranks = tuple(tuple(np.ndim(a) - 1 for a in jax.tree.leaves(g)) for g in groups)
    return Stacked(groups, layout, ranks)

  def leaves(self) -> list[Any]:
    """Each leaf's values; ``()`` for the layout's empty leaves, which hold none."""
    fill = [()] * len(self.layout.shapes)
    return self.layout.unstack(self.groups, fill, self.ranks)

  def tree(self) -> Any:
    """The per-leaf values as a tree like the updates."""
    return jax.tree.unflatten(self.layout.treedef, self.leaves())

  def __getitem__(self, key: Any) -> Any:
    return self.tree()[key]

  def __repr__(self) -> str:
    return f"Stacked({self.tree()!r})"


jax.tree_util.register_dataclass(
  Stacked, data_fields=["groups"], meta_fields=["layout", "ranks"]
)


def mismatch(call: str, layout: Layout, expected: Layout, what: str) -> str | None:
  """Why a state made for ``expected`` cannot serve updates of ``layout``, or None."""
  if layout == expected:
    return None
  if layout.treedef != expected.treedef:
    return (
      f"{call}: the {what} was made by init for a tree of structure"
      f" {expected.treedef}, but the updates have structure {layout.treedef}."
    )
  names = layout.names
  for name, a, b, da, db in zip(
    names, layout.shapes, expected.shapes, layout.dtypes, expected.dtypes, strict=True
  ):
    if a != b or da != db:
      where = f"leaf {name}" if name else "its only leaf (the updates are one array)"
      return (
        f"{call}: the state does not fit the updates at {where}: shape {a}"
        f" ({da}) in the updates, {b} ({db}) in the {what} (was it made by init"
        " from another tree?)."
      )
  return f"{call}: the {what} was made by init for another tree."

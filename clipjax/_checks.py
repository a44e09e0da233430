"""Checks of hyperparameters and states that name the call, argument and value."""

from collections.abc import Callable
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np

from clipjax._layout import Layout, Stacked, mismatch

MANY_BOUNDS = (
  "To apply many bounds at once, jax.vmap over a function that builds and"
  " applies the transformation (the bound is then a scalar inside)."
)


def is_concrete(value: Any) -> bool:
  """True if ``value`` can be inspected in Python (not a tracer)."""
  return not isinstance(value, jax.core.Tracer)


def shown(value: Any) -> str:
  """``repr(value)``, or ``<traced float32[3]>`` for a tracer."""
  if is_concrete(value):
    return repr(value)
  return f"<traced {jax.typeof(value).str_short()}>"


def check_bound(
  call: str,
  name: str,
  value: Any,
  *,
  allow_inf: bool = False,
  positive: bool = False,
  scalar: bool = True,
  hint: str = MANY_BOUNDS,
) -> None:
  """Raises ``ValueError`` unless ``value`` is a valid bound for ``call``.

  Valid means: a real number (an int or float, a NumPy or JAX scalar; not a
  string, a bool or ``None``), a scalar unless ``scalar=False``, and, when
  concrete, not NaN, not negative (not zero either if ``positive``) and finite
  unless ``allow_inf``. A traced value's dtype and shape are static, so they
  are checked; its value is never inspected with Python ``if``.

  Args:
    call: the public call, for the message.
    name: the argument's name, for the message.
    value: the bound.
    allow_inf: whether ``inf`` is a valid bound.
    positive: whether zero is excluded.
    scalar: whether the bound must be a scalar (global, per-leaf and per-slice
      bounds); ``False`` accepts an array (``clip``'s element-wise bounds).
    hint: what the message says after "must be a scalar".

  Raises:
    ValueError: naming the call, the argument and the value.

  Examples:
    >>> from clipjax._checks import check_bound
    >>> check_bound("clip_by_norm", "max_norm", 1.0)
    >>> check_bound("clip_by_norm", "max_norm", "1.0")
    Traceback (most recent call last):
    ...
    ValueError: clip_by_norm(max_norm='1.0') must be a number, not a str.
    >>> check_bound("clip_by_norm", "max_norm", [1.0, 2.0], hint="")
    Traceback (most recent call last):
    ...
    ValueError: clip_by_norm(max_norm=[1.0, 2.0]) must be a scalar; got shape (2,).
  """
  head = f"{call}({name}={shown(value)})"
  if value is None or isinstance(value, str | bytes | bool | np.bool_):
    raise ValueError(f"{head} must be a number, not a {type(value).__name__}.")
  if is_concrete(value):
    try:
      arr = np.asarray(value)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{head} must be a number.") from e
  else:
    arr = value
  dtype = arr.dtype
  if not jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(
    dtype, jnp.complexfloating
  ):
    raise ValueError(f"{head} must be a real number; got dtype {dtype}.")
  if scalar and np.ndim(arr) != 0:
    raise ValueError(
      f"{head} must be a scalar; got shape {np.shape(arr)}."
      + (f" {hint}" if hint else "")
    )
  if not is_concrete(value):
    return
  arr = arr.astype(np.float64)
  bad = (
    np.isnan(arr)
    | (arr <= 0 if positive else arr < 0)
    | (np.isinf(arr) if not allow_inf else np.zeros_like(arr, dtype=bool))
  )
  if np.any(bad):
    kind = "positive" if positive else "non-negative"
    finite = "" if allow_inf else " finite"
    raise ValueError(f"{head} must be a{finite} {kind} number.")


class TreeShapes:
  """The leaf paths and shapes of the tree a state was made for, with no arrays.

  A pytree node without children: it travels in a state's structure as static
  metadata (``jax.jit``, ``jax.vmap``, checkpoints restored into a target keep
  it), so that ``update`` can name the first leaf where the updates differ
  from the tree ``init`` saw. ``TreeShapes()`` (no tree recorded, as in a
  state built by hand) checks nothing.

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipjax._checks import TreeShapes
    >>> made_for = TreeShapes.of({"w": jnp.zeros(3)})
    >>> made_for.check("zclip", {"w": jnp.ones(4)})
    Traceback (most recent call last):
    ...
    ValueError: zclip: the state does not fit the updates at leaf ['w']: shape (4,)
    in the updates, (3,) in the state. ...
  """

  __slots__ = ("_hash", "paths", "shapes")

  def __init__(
    self, paths: tuple[str, ...] | None = None, shapes: tuple[Any, ...] = ()
  ) -> None:
    self.paths = paths
    self.shapes = shapes
    self._hash = hash((paths, shapes))

  @classmethod
  def of(cls, tree: Any) -> "TreeShapes":
    """The paths and shapes of ``tree``'s leaves."""
    found = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = tuple(jax.tree_util.keystr(p) for p, _ in found)
    return cls(paths, tuple(tuple(np.shape(x)) for _, x in found))

  def __eq__(self, other: object) -> bool:
    if self is other:
      return True
    if not isinstance(other, TreeShapes) or self._hash != other._hash:
      return False
    return self.paths == other.paths and self.shapes == other.shapes

  def __hash__(self) -> int:
    return self._hash

  def __repr__(self) -> str:
    return (
      "TreeShapes()" if self.paths is None else f"TreeShapes({len(self.paths)} leaves)"
    )

  def check(self, call: str, updates: Any) -> None:
    """Raises ``ValueError`` naming the first leaf where ``updates`` differ."""
    paths = self.paths
    if paths is None:
      return
    other = TreeShapes.of(updates)
    if other == self or other.paths is None:
      return
    mine = dict(zip(paths, self.shapes, strict=True))
    for path, shape in zip(other.paths, other.shapes, strict=True):
      if path not in mine:
        _mismatch(call, path, shape, None)
      if mine[path] != shape:
        _mismatch(call, path, shape, mine[path])
    theirs = set(other.paths)
    extra = next((p for p in paths if p not in theirs), None)
    if extra is not None:
      _mismatch(call, extra, None, mine[extra])


jax.tree_util.register_pytree_node(
  TreeShapes, lambda t: ((), t), lambda aux, children: aux
)


def _mismatch(
  call: str, path: str, in_updates: Any, in_state: Any, fits: Any = None
) -> NoReturn:
  """Raises the ``ValueError`` for a state made for another tree, at ``path``."""
  if in_updates is None:
    updates = "no such leaf in the updates"
  else:
    updates = f"shape {in_updates} in the updates"
  state = (
    "no such leaf in the state" if in_state is None else f"{in_state} in the state"
  )
  if fits is not None and fits != in_updates:
    state += f" where {fits} fits"
  leaf = f"leaf {path}" if path else "its only leaf (the updates are one array)"
  raise ValueError(
    f"{call}: the state does not fit the updates at {leaf}: {updates},"
    f" {state}. Was the state made by init from another tree (or restored from"
    " another model's checkpoint)? init and update need trees of one structure"
    " and leaf shapes."
  )


def _child(tree: Any, key: Any) -> Any:
  """The child of ``tree`` that ``key`` (a ``jax.tree_util`` key) names."""
  if isinstance(key, jax.tree_util.DictKey):
    return tree[key.key]
  if isinstance(key, jax.tree_util.SequenceKey):
    return tree[key.idx]
  if isinstance(key, jax.tree_util.GetAttrKey):
    return getattr(tree, key.name)
  children = jax.tree_util.tree_flatten(tree, is_leaf=lambda node: node is not tree)[0]
  return children[key.key]


def _subtree(tree: Any, path: tuple[Any, ...]) -> Any:
  for key in path:
    tree = _child(tree, key)
  return tree


def _structure(tree: Any) -> Any:
  return jax.tree.structure(tree)


def _shapes(tree: Any) -> list[tuple[int, ...]]:
  return [tuple(np.shape(x)) for x in jax.tree.leaves(tree)]


def _described(shapes: list[tuple[int, ...]]) -> Any:
  """One shape as itself, several as a list, none as words."""
  if not shapes:
    return "no array"
  return shapes[0] if len(shapes) == 1 else shapes


def check_state_fits(call: str, updates: Any, state: Any, expected: Any) -> None:
  """Raises ``ValueError`` unless a per-leaf ``state`` fits ``updates``.

  ``state`` is a part of ``call``'s state built by ``init`` as a tree like the
  updates (a residual, a second moment per leaf), and ``expected`` the same
  part as ``init`` would build it for ``updates`` (arrays or
  ``jax.ShapeDtypeStruct``). Structures and shapes are static, so this runs
  at trace time; dtypes are not compared.

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipjax._checks import check_state_fits
    >>> g = {"w": jnp.ones(4)}
    >>> check_state_fits("spam_clip", g, {"w": jnp.zeros(3)}, g)
    Traceback (most recent call last):
    ...
    ValueError: spam_clip: the state does not fit the updates at leaf ['w']:
    shape (4,) in the updates, (3,) in the state. ...
  """
  same_structure = _structure(state) == _structure(expected)
  if same_structure and _shapes(state) == _shapes(expected):
    return
  for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
    want = _subtree(expected, path)
    try:
      got = _subtree(state, path)
    except (KeyError, IndexError, AttributeError, TypeError):
      _mismatch(call, jax.tree_util.keystr(path), np.shape(leaf), None)
    if _structure(got) != _structure(want) or (_shapes(got) != _shapes(want)):
      _mismatch(
        call,
        jax.tree_util.keystr(path),
        np.shape(leaf),
        _described(_shapes(got)),
        _described(_shapes(want)),
      )
  raise ValueError(
    f"{call}: the state does not fit the updates: it holds leaves the updates"
    f" lack (state structure {jax.tree.structure(state)}, expected"
    f" {jax.tree.structure(expected)}). Was the state made by init from"
    " another tree? init and update need trees of one structure and leaf shapes."
  )


def check_stacked_fits(
  call: str,
  what: str,
  held: Any,
  layout: Layout,
  updates: Any,
  expected: Callable[[], Any],
) -> None:
  """Raises ``ValueError`` unless ``held`` (a :class:`Stacked` state part) fits.

  ``held`` is the part of ``call``'s state named ``what`` (``"state's gamma"``),
  stacked by ``init`` for a tree of ``layout``. The quick path is one static
  comparison of layouts; only on a mismatch is ``expected()`` called for the
  per-leaf tree ``init`` would build for ``updates``, so that the error names
  the first leaf that differs (as :func:`check_state_fits` does).
  """
  if isinstance(held, Stacked) and held.layout == layout:
    return
  got = held.tree() if isinstance(held, Stacked) else held
  check_state_fits(call, updates, got, expected())
  why = mismatch(call, layout, held.layout, what) if isinstance(held, Stacked) else None
  raise ValueError(why or f"{call}: the {what} does not fit the updates.")

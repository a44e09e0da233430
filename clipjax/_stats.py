"""Clip statistics carried in optimizer state, and the state -> dict helper."""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from clipjax._layout import Stacked


@dataclasses.dataclass(frozen=True)
class ClipStats:
  """What a clipper saw and did on its last update (all zeros before the first).

  A registered pytree whose name is static metadata, so that
  :func:`clip_stats` can label it wherever it sits in an optax state tree. All
  array fields are float32.

  Attributes:
    norm: the size compared with the bound, before clipping: the L2 norm (RMS for
      ``clip_by_block_rms``, max ``|x|`` for ``clip``). A scalar for whole-tree
      clippers; for per-block clippers one value per block (a scalar per leaf,
      or one per unit or slice) held as a :class:`~clipjax.Stacked`: one
      vector per shape of block, however many leaves, that reads as a tree
      like the updates (``stats.norm["w"]``, ``stats.norm.tree()``). For an
      update that is a single array, an array.
    scale: the factor applied, shaped like ``norm`` (1.0 = untouched).
    bound: the bound in force, a scalar or shaped like ``norm``.
    clipped_fraction: shape ``()``: the fraction of blocks scaled down.
    extra: clipper-specific values by name (e.g. ``zclip``'s EMA mean, the
      steps ``skip_and_clip`` skipped); empty for most clippers.
    name: the clipper's name (static).

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> tx = clipjax.clip_by_norm(1.0)
    >>> _, stats = tx.update({"a": jnp.array([3.0, 4.0]), "b": jnp.ones(2)}, None)
    >>> print(stats.name, stats.norm["a"], stats.scale["a"], stats.clipped_fraction)
    clip_by_norm 5.0 0.2 1.0
  """

  norm: Any
  scale: Any
  bound: Any
  clipped_fraction: jax.Array
  extra: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  name: str = "clip"


jax.tree_util.register_dataclass(
  ClipStats,
  data_fields=["norm", "scale", "bound", "clipped_fraction", "extra"],
  meta_fields=["name"],
)

_FIELDS = ("norm", "scale", "bound", "clipped_fraction")


def _f32(x: Any) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


def make_stats(
  name: str,
  norm: Any,
  scale: Any,
  bound: Any,
  clipped_fraction: Any,
  extra: dict[str, Any] | None = None,
) -> ClipStats:
  """Builds a :class:`ClipStats`, casting the main fields to float32.

  ``extra`` values keep their dtype (counters stay int32).
  """
  return ClipStats(
    norm=jax.tree.map(_f32, norm),
    scale=jax.tree.map(_f32, scale),
    bound=jax.tree.map(_f32, bound),
    clipped_fraction=_f32(clipped_fraction),
    extra={k: jnp.asarray(v) for k, v in (extra or {}).items()},
    name=name,
  )


def with_stats(
  apply: Callable[[Any, Any], tuple[Any, ClipStats]],
) -> optax.GradientTransformation:
  """Wraps ``apply(updates, params) -> (updates, stats)`` as a transformation.

  The state is the :class:`ClipStats` of the last update; ``init`` returns
  zeros of the same structure (found with ``jax.eval_shape``, so nothing is
  computed). ``update`` ignores the incoming state, so ``state=None`` works as
  with optax's stateless clippers.
  """

  def init_fn(params):
    shapes = jax.eval_shape(lambda p: apply(p, p)[1], params)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def update_fn(updates, state, params=None):
    del state
    return apply(updates, params)

  return optax.GradientTransformation(init_fn, update_fn)


def _is_box(key: Any) -> bool:
  """True for the ``.value`` step of a wrapper such as a Flax NNX variable."""
  return isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value"


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def labelled(opt_state: Any, kind: type) -> list[tuple[str, Any]]:
  """Every node of type ``kind`` in ``opt_state``, with its readable name.

  The name is ``"<labels>/<node.name>"``, the labels being the string keys on
  the way down; a name that repeats gets ``_1``, ``_2``, ... Shared by
  :func:`clip_stats` and ``clipjax.compression.compression_stats``.
  """
  found = jax.tree_util.tree_flatten_with_path(
    opt_state, is_leaf=lambda x: isinstance(x, kind)
  )[0]
  out = []
  seen: dict[str, int] = {}
  for path, node in found:
    if not isinstance(node, kind):
      continue
    labels = [
      str(k.key)
      for k in path
      if isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str)
    ]
    base = "/".join([*labels, str(getattr(node, "name", kind.__name__))])
    count = seen.get(base, 0)
    seen[base] = count + 1
    out.append((f"{base}_{count}" if count else base, node))
  return out


def clip_stats(opt_state: Any) -> dict[str, jax.Array]:
  """Flattens every clipper's statistics in an optax state tree into a dict.

  Works through ``optax.chain``, ``named_chain``, ``masked``,
  ``multi_transform``, ``inject_hyperparams``, ``MultiSteps`` and any other
  wrapper, because it searches the state as a pytree. Names are
  ``"<labels>/<clipper>/<field>"``, where the labels are the string keys on the
  way down (``named_chain`` names, ``multi_transform`` labels); per-block fields
  add the leaf path. A clipper name that repeats gets ``_1``, ``_2``, ...

  A state without clippers, or whose clippers keep no statistics
  (``clip(..., stats=False)``), gives ``{}``. A state that holds no
  :class:`ClipStats` but plain dicts with their fields is a checkpoint restored
  without a target (orbax then rebuilds every node as a dict): that raises
  ``ValueError``, where ``{}`` would leave a logger silently empty. Restore
  into the optimizer's state tree instead, e.g.
  ``checkpointer.restore(path, jax.eval_shape(tx.init, params))``.

  Args:
    opt_state: any optax state (or pytree holding one).

  Returns:
    A dict from readable names to arrays, ready for a logger.

  Raises:
    ValueError: if ``opt_state`` holds no :class:`ClipStats` but holds a
      mapping with their fields, as a checkpoint restored without a target.

  Examples:
    >>> import jax.numpy as jnp, optax, clipjax
    >>> tx = optax.chain(clipjax.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> g = {"w": jnp.array([3.0, 4.0])}
    >>> _, state = tx.update(g, tx.init(g))
    >>> {k: float(v) for k, v in clipjax.clip_stats(state).items()}
    {'clip_by_global_norm/norm': 5.0, 'clip_by_global_norm/scale': 0.2,
     'clip_by_global_norm/bound': 1.0, 'clip_by_global_norm/clipped_fraction': 1.0}
    >>> clipjax.clip_stats(optax.sgd(0.1).init(g))  # no clipper: nothing to log
    {}
    >>> restored = [{"norm": 5.0, "scale": 0.2, "bound": 1.0,
    ...              "clipped_fraction": 1.0, "extra": {}}, {}]
    >>> clipjax.clip_stats(restored)
    Traceback (most recent call last):
    ...
    ValueError: clip_stats: the state holds no ClipStats, but [0] is a plain dict
    with their fields (norm, scale, bound, clipped_fraction): a checkpoint restored
    without a target? ...
  """
  out: dict[str, jax.Array] = {}
  for base, node in labelled(opt_state, ClipStats):
    for field in _FIELDS:
      value = getattr(node, field)
      if isinstance(value, Stacked):
        value = value.tree()
      for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
        suffix = "".join("/" + _key_name(k) for k in leaf_path if not _is_box(k))
        out[f"{base}/{field}{suffix}"] = leaf
    for key, value in node.extra.items():
      out[f"{base}/{key}"] = getattr(value, "value", value)
  if not out:
    _check_not_restored_without_target(opt_state)
  return out


def _looks_like_stats(node: Any) -> bool:
  return isinstance(node, Mapping) and all(f in node for f in _FIELDS)


def _check_not_restored_without_target(opt_state: Any) -> None:
  """Raises if ``opt_state`` holds mappings with :class:`ClipStats`' fields."""
  found = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_looks_like_stats)[0]
  for path, node in found:
    if _looks_like_stats(node):
      raise ValueError(
        f"clip_stats: the state holds no ClipStats, but"
        f" {jax.tree_util.keystr(path) or 'the state'} is a plain"
        f" {type(node).__name__} with their fields ({', '.join(_FIELDS)}): a"
        " checkpoint restored without a target? Restore it into the optimizer's"
        " state tree, e.g. checkpointer.restore(path, jax.eval_shape(tx.init,"
        " params)), and pass that."
      )

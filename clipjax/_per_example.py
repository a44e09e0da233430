"""Per-example clipping of explicit per-example gradients (optax's functions).

The per-example norms are computed without materialising anything beyond the
gradients themselves; an example whose norm is not finite is dropped: it adds
zero to the sum and is counted among the clipped.
"""

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from clipjax import _ghost, _norms
from clipjax._checks import check_bound


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["norms", "num_nonfinite"],
  meta_fields=["vmapped"],
)
@dataclasses.dataclass(frozen=True)
class PerExampleClipInfo:
  """Per-example detail of a clipped sum.

  A pytree (so it can leave ``jax.jit``) whose ``vmapped`` field is static.

  Attributes:
    norms: shape ``(B,)``, float32: each example's norm before clipping, NaN or
      inf for a dropped example; a pytree of them, with the bounds' structure,
      for per-group bounds.
    num_nonfinite: shape ``()``, int32: the examples dropped because their
      gradient was not finite.
    vmapped: the parameters, as ``jax.tree_util.keystr`` paths, whose
      per-example gradients ``jax.vmap`` formed in
      :func:`per_example_clipped_grad` (static; empty for
      :func:`per_example_global_norm_clip`).

  Examples:
    >>> import jax.numpy as jnp, clipjax
    >>> g = {"w": jnp.array([[3.0, 4.0], [jnp.inf, 0.0]])}
    >>> _, _, info = clipjax.per_example_global_norm_clip(g, 1.0, return_info=True)
    >>> print(info.norms, info.num_nonfinite)
    [ 5. inf] 1
  """

  norms: Any  # shape=(B,), float32 (a tree of them for per-group bounds)
  num_nonfinite: jax.Array  # shape=(), int32: examples dropped as not finite
  # Parameters whose per-example gradients were formed by jax.vmap (by
  # per_example_clipped_grad), as jax.tree_util.keystr paths.
  vmapped: tuple[str, ...] = ()


def _batch_leaves(
  call: str, grads: Any
) -> tuple[list[jax.Array], list[tuple[int, ...]]]:
  """The per-example leaves (integers as float32) and the axes of one example.

  Raises ``ValueError`` unless every leaf has the same batch size on axis 0.
  """
  leaves = [jnp.asarray(g) for g in jax.tree.leaves(grads)]
  if not leaves or any(g.ndim < 1 or g.shape[0] != leaves[0].shape[0] for g in leaves):
    raise ValueError(
      f"Unlike other transforms, `{call}` expects `grads` to have a batch"
      " dimension in the 0th axis; got shapes:"
      f" {jax.tree.map(jnp.shape, grads)}."
    )
  leaves = [
    g if jnp.issubdtype(g.dtype, jnp.inexact) else g.astype(jnp.float32) for g in leaves
  ]
  return leaves, [tuple(range(1, g.ndim)) for g in leaves]


_ONE_BOUND = "It is one bound for every example (jax.vmap the call for many)."


def _weighted_sums(
  leaves: list[jax.Array],
  multipliers: list[jax.Array],
  keep: list[jax.Array],
  all_kept: jax.Array,
) -> list[jax.Array]:
  """``sum_b multipliers[i][b] * leaves[i][b]`` per leaf, dropping unkept examples.

  A dropped example holds non-finite values, which a zero multiplier would
  turn into NaN: its rows are masked out, but only when there is one (one
  ``lax.cond`` for the tree), so that the common step is optax's one
  contraction per leaf, with no masked copy of the per-example gradients.
  Half-precision leaves are summed in float32 and rounded once.
  """

  def plain():
    out = []
    for g, m in zip(leaves, multipliers, strict=True):
      acc = _norms.accumulation_dtype(g.dtype)
      out.append(jnp.tensordot(m.astype(acc), g.astype(acc), axes=1).astype(g.dtype))
    return out

  def masked():
    # One fused select-multiply-reduce per leaf: slower than the contraction
    # on CPU, but cheap to compile, for the step that needs it.
    out = []
    for g, m, k in zip(leaves, multipliers, keep, strict=True):
      acc = _norms.accumulation_dtype(g.dtype)
      rows = tuple(range(1, g.ndim))
      weighted = g.astype(acc) * jnp.expand_dims(m.astype(acc), rows)
      kept = jnp.where(jnp.expand_dims(k, rows), weighted, jnp.zeros((), acc))
      out.append(jnp.sum(kept, axis=0).astype(g.dtype))
    return out

  return lax.cond(all_kept, plain, masked)


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
  leaves, axes = _batch_leaves(call, grads)
  check_bound(call, "l2_norm_clip", l2_norm_clip, allow_inf=True, hint=_ONE_BOUND)
  norms = _norms.block_norms(leaves, axes, combine=True)[0]
  finite = jnp.isfinite(norms)
  multipliers = jnp.where(finite, _norms.clip_scale(norms, l2_norm_clip), 0)
  num_clipped = jnp.sum(multipliers < 1, dtype=jnp.int32)
  n = len(leaves)
  sums = _weighted_sums(leaves, [multipliers] * n, [finite] * n, jnp.all(finite))
  summed = jax.tree.unflatten(jax.tree.structure(grads), sums)
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
  leaves, axes = _batch_leaves(call, grads)
  check_bound(
    call, "global_l2_norm_clip", global_l2_norm_clip, allow_inf=True, hint=_ONE_BOUND
  )
  if uniform:
    bounds = [global_l2_norm_clip * (1.0 / len(leaves)) ** 0.5] * len(leaves)
  else:
    total = sum(g[0].size for g in leaves)
    bounds = [global_l2_norm_clip * (g[0].size / total) ** 0.5 for g in leaves]
  # Every leaf's per-example norms at once: one overflow check for the tree.
  norms = _norms.block_norms(leaves, axes)
  finite = [jnp.isfinite(n) for n in norms]
  multipliers = [
    jnp.where(f, _norms.clip_scale(n, b), 0)
    for n, f, b in zip(norms, finite, bounds, strict=True)
  ]
  clipped = [jnp.sum(m < 1, dtype=jnp.int32) for m in multipliers]
  all_finite = jnp.all(jnp.stack([jnp.all(f) for f in finite]))
  sums = _weighted_sums(leaves, multipliers, finite, all_finite)
  treedef = jax.tree.structure(grads)
  return jax.tree.unflatten(treedef, sums), jax.tree.unflatten(treedef, clipped)


_METHODS = ("auto", "ghost", "vmap")


def _is_nnx_module(x: Any) -> bool:
  flax = sys.modules.get("flax.nnx")
  return flax is not None and isinstance(x, flax.Module)


def _batch_size(call: str, batch: Sequence[Any]) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError(f"{call}: no batch given; call it as f(params, *batch).")
  shapes = [jnp.shape(x) for x in leaves]
  if any(len(s) == 0 for s in shapes) or len({s[0] for s in shapes}) != 1:
    raise ValueError(
      f"{call}: every batch array needs the same leading (batch) dimension; got"
      f" shapes {shapes}."
    )
  return int(shapes[0][0])


def _groups(call: str, l2_clip: Any, params: Any) -> tuple[list[Any], list[int], Any]:
  """The bounds, each leaf's group, and the structure of ``norms``."""
  bounds, bound_def = jax.tree.flatten(l2_clip)
  if jax.tree_util.treedef_is_leaf(bound_def):
    return bounds, [0] * len(jax.tree.leaves(params)), None
  index = jax.tree.unflatten(bound_def, range(len(bounds)))
  try:
    per_leaf = jax.tree.map(
      lambda i, sub: jax.tree.map(lambda _: i, sub), index, params
    )
  except ValueError as e:
    raise ValueError(
      f"{call}: l2_clip must be a number or a pytree prefix of the parameters"
      f" (one bound per leaf or per group); got {l2_clip!r}."
    ) from e
  return bounds, jax.tree.leaves(per_leaf), bound_def


def per_example_clipped_grad(
  loss_fn: Callable[..., Any],
  *,
  l2_clip: Any,
  method: str = "auto",
  microbatch_size: int | None = None,
  has_aux: bool = False,
  return_info: bool = False,
) -> Callable[..., Any]:
  r"""The sum over a batch of per-example gradients, each clipped in L2 norm.

  ``loss_fn(params, *batch)`` must return the per-example losses, shape
  ``(B,)`` (with ``has_aux``, a pair ``(losses, aux)``), and treat examples
  independently. The returned ``f(params, *batch)`` gives ``(grads, norms)``:
  ``grads`` shaped like ``params`` holds :math:`\sum_b g_b \min(1, C/\|g_b\|)`,
  ``norms`` the norms :math:`\|g_b\|` before clipping, shape ``(B,)``, float32.

  Methods:

  - ``"vmap"`` forms every per-example gradient with ``jax.vmap``; memory grows
    with ``B`` times the model, which ``microbatch_size`` bounds (the batch is
    processed in a sequential loop over chunks of that size).
  - ``"ghost"`` reads the jaxpr of ``loss_fn``, traced at batch sizes ``B`` and
    ``B + 1`` to tell batch dimensions apart, and finds where each parameter
    meets the batch. Dense layers (``x @ W``, any ``dot_general`` of a parameter
    with an activation, also with sequence inputs ``(B, T, d)``) and embedding
    lookups (``W[ids]``) get their per-example norms from the layer's inputs and
    output gradients (ghost norms: the Gram form when ``T (d_in + d_out) <=
    d_in d_out``, else the per-example outer product); convolution kernels
    (``lax.conv_general_dilated``, ``nnx.Conv``; any strides, dilations,
    padding, layout and feature groups) theirs from the input sliced once per
    window position, by the Gram form or the per-example kernel gradient,
    whichever costs less; biases and other parameters broadcast over the
    batch in an elementwise op (layer-norm scales) get small explicit
    per-example gradients. One backward pass gives the output gradients, and
    one transposed product per layer, with each example's rows scaled by its
    clip factor, gives the clipped sum (book-keeping). The same rules apply
    inside ``scan`` bodies (``nnx.scan`` over stacked blocks, ``fori_loop``):
    a parameter stacked along the scan sums its iterations' norms, a dense
    weight the body closes over is one layer seeing every iteration's
    positions. Anything else (custom derivative rules, a weight used by two
    layers, a parameter carried by a scan) falls back to ``jax.vmap`` for that
    parameter only; ``f.plan(params, *batch)`` lists how each is handled.
  - ``"auto"`` (default): ``"ghost"``, or ``"vmap"`` when the loss traces to a
    different program at the second batch size (``"ghost"`` then raises).

  Works on plain pytrees of parameters and on Flax NNX modules: given an
  ``nnx.Module``, ``loss_fn`` receives the module and ``grads`` is the
  ``nnx.State`` of its ``nnx.Param`` variables, as ``nnx.grad`` would return.

  An example whose gradient is not finite is dropped (it adds zero); its norm
  is reported as NaN or inf, and ``return_info=True`` counts them.

  Args:
    loss_fn: ``loss_fn(params, *batch) -> losses`` of shape ``(B,)``.
    l2_clip: the bound ``C``: a number or traced scalar, or a pytree prefix of
      the parameters giving one bound per leaf or per group of leaves (each
      group is clipped on its own, as in McMahan et al. 2018; ``norms`` is then
      a pytree of ``(B,)`` arrays with the bounds' structure).
    method: ``"auto"``, ``"ghost"`` or ``"vmap"``.
    microbatch_size: process the batch in chunks of this many examples (must
      divide ``B``); bounds memory for ``"vmap"``.
    has_aux: ``loss_fn`` returns ``(losses, aux)``; ``f`` then returns
      ``(grads, norms, aux)``.
    return_info: return a :class:`PerExampleClipInfo` in place of ``norms``:
      the norms, the count of dropped examples, and the parameters whose
      per-example gradients ``jax.vmap`` formed (``vmapped``).

  Returns:
    ``f(params, *batch)`` as described, with an attribute ``plan``.

  Examples:
    >>> import jax, jax.numpy as jnp, clipjax
    >>> def loss_fn(params, x, y):
    ...   return (x @ params["w"] + params["b"] - y) ** 2
    >>> params = {"w": jnp.ones(3), "b": jnp.zeros(())}
    >>> x, y = jnp.eye(3) * jnp.array([1.0, 2.0, 10.0]), jnp.zeros(3)
    >>> f = clipjax.per_example_clipped_grad(loss_fn, l2_clip=1.0)
    >>> grads, norms = jax.jit(f)(params, x, y)
    >>> print(norms)
    [  2.828427   8.944272 200.99751 ]
    >>> print(grads["w"], grads["b"])
    [0.70710677 0.8944272  0.9950371 ] 1.2538241
    >>> f.plan(params, x, y)
    {"['b']": 'ghost: elementwise (per-example, small)', "['w']": 'ghost: dense (T=1)'}

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, 2016. Li et al., `Large Language
    Models Can Be Strong Differentially Private Learners
    <https://arxiv.org/abs/2110.05679>`_, 2022. Bu et al., `Differentially
    Private Optimization on Large Model at Small Cost
    <https://arxiv.org/abs/2210.00038>`_, 2023.
  """
  call = "per_example_clipped_grad"
  if method not in _METHODS:
    raise ValueError(f"{call}(method={method!r}) must be one of {_METHODS}.")
  if microbatch_size is not None and (
    not isinstance(microbatch_size, int) or microbatch_size < 1
  ):
    raise ValueError(
      f"{call}(microbatch_size={microbatch_size!r}) must be a positive int or None."
    )
  if not callable(loss_fn):
    raise TypeError(f"{call}: loss_fn must be callable; got {loss_fn!r}.")
  _check_l2_clip(call, l2_clip)

  def f(params: Any, *batch: Any) -> Any:
    loss, params = _unwrap_nnx(loss_fn, params)
    return _clipped_grad(
      call, loss, params, batch, l2_clip, method, microbatch_size, has_aux, return_info
    )

  def plan(params: Any, *batch: Any) -> dict[str, str]:
    """How each parameter leaf's per-example norm is computed under ``"ghost"``."""
    loss, params = _unwrap_nnx(loss_fn, params)
    return _plan(call, loss, params, batch, has_aux)

  f.plan = plan  # type: ignore[attr-defined]
  return f


def _check_l2_clip(call: str, l2_clip: Any) -> None:
  """Each bound in ``l2_clip`` (one, or a tree of them) is a scalar bound."""
  hint = (
    "l2_clip is one scalar bound, or a pytree prefix of the parameters holding"
    " one scalar bound per leaf or per group."
  )
  found = jax.tree_util.tree_flatten_with_path(l2_clip)[0]
  if not found:
    raise ValueError(f"{call}(l2_clip={l2_clip!r}) holds no bound. {hint}")
  for path, bound in found:
    name = "l2_clip" + jax.tree_util.keystr(path)
    check_bound(call, name, bound, allow_inf=True, hint=hint)


def _unwrap_nnx(
  loss_fn: Callable[..., Any], params: Any
) -> tuple[Callable[..., Any], Any]:
  """For a Flax NNX module, the loss as a function of its ``nnx.Param`` state."""
  if not _is_nnx_module(params):
    return loss_fn, params
  from flax import nnx

  graphdef, state, *rest = nnx.split(params, nnx.Param, ...)

  def loss(p: Any, *batch: Any) -> Any:
    return loss_fn(nnx.merge(graphdef, p, *rest), *batch)

  return loss, state


def _flat_loss(
  call: str,
  loss_fn: Callable[..., Any],
  params_def: Any,
  n: int,
  batch_def: Any,
  has_aux: bool,
) -> Callable[..., Any]:
  """``loss_fn`` as a function of flat leaves, returning ``(losses, aux)``."""

  def flat(*xs: Any) -> tuple[Any, Any]:
    params = jax.tree.unflatten(params_def, xs[:n])
    batch = jax.tree.unflatten(batch_def, xs[n:])
    out = loss_fn(params, *batch)
    if not has_aux:
      return out, None
    if not (isinstance(out, tuple) and len(out) == 2):
      raise ValueError(f"{call}: with has_aux=True, loss_fn must return (losses, aux).")
    return out

  return flat


def _check_losses(call: str, losses: Any, batch_size: int) -> None:
  shape = getattr(losses, "shape", None)
  if shape != (batch_size,):
    hint = " Return the losses before averaging (no `.mean()`)." if shape == () else ""
    raise ValueError(
      f"{call}: loss_fn must return per-example losses of shape (B,) ="
      f" ({batch_size},); got {type(losses).__name__} with shape {shape}.{hint}"
    )


def _abstract(xs: Sequence[Any], batch_size: int | None = None) -> list[Any]:
  out = []
  for x in xs:
    shape = tuple(jnp.shape(x))
    if batch_size is not None:
      shape = (batch_size, *shape[1:])
    out.append(jax.ShapeDtypeStruct(shape, jnp.result_type(x)))
  return out


class _Traced(NamedTuple):
  """``loss_fn`` flattened and traced at the batch size ``b`` (and ``b + 1``)."""

  flat: Callable[..., Any]
  batch_leaves: list[Any]
  b: int
  closed: Any
  closed2: Any  # at b + 1, to tell batch dimensions apart; None if not wanted
  out_shape: Any


def _trace(
  call: str,
  loss_fn: Callable[..., Any],
  leaves: list[Any],
  params_def: Any,
  batch: Sequence[Any],
  has_aux: bool,
  *,
  second: bool,
) -> _Traced:
  """Traces the loss, checks its per-example shape, and traces it at ``b + 1``."""
  batch_leaves, batch_def = jax.tree.flatten(tuple(batch))
  b = _batch_size(call, batch)
  flat = _flat_loss(call, loss_fn, params_def, len(leaves), batch_def, has_aux)
  closed, out_shape = jax.make_jaxpr(flat, return_shape=True)(
    *_abstract(leaves), *_abstract(batch_leaves)
  )
  _check_losses(call, out_shape[0], b)
  closed2 = None
  if second:
    closed2 = jax.make_jaxpr(flat)(*_abstract(leaves), *_abstract(batch_leaves, b + 1))
  return _Traced(flat, batch_leaves, b, closed, closed2, out_shape)


def _vmap_grads(
  flat: Callable[..., Any], leaves: list[Any], which: list[int], batch_leaves: list[Any]
) -> list[jax.Array]:
  """Per-example gradients of ``leaves[i]`` for ``i`` in ``which``, by ``jax.vmap``."""

  def one(sub: list[Any], *example: Any) -> jax.Array:
    full = list(leaves)
    for i, x in zip(which, sub, strict=True):
      full[i] = x
    losses, _ = flat(*full, *(e[None] for e in example))
    return losses[0]

  in_axes = (None, *([0] * len(batch_leaves)))
  return jax.vmap(jax.grad(one), in_axes=in_axes)(
    [leaves[i] for i in which], *batch_leaves
  )


def _weighted_sum(
  c: jax.Array, keep: jax.Array, per_example: jax.Array, like: Any
) -> jax.Array:
  """``sum_b c_b g_b`` over the kept examples, in ``like``'s dtype."""
  acc = _norms.accumulation_dtype(per_example.dtype)
  kept = jnp.where(
    _ghost.expand_rows(keep, per_example, 0),
    per_example,
    jnp.zeros((), per_example.dtype),
  )
  return jnp.tensordot(c.astype(acc), kept.astype(acc), axes=1).astype(like.dtype)


def _sq_norms(per_example: jax.Array) -> jax.Array:
  x = per_example.astype(_norms.accumulation_dtype(per_example.dtype))
  return jnp.sum(x * x, axis=tuple(range(1, x.ndim)))


class _Parts(NamedTuple):
  """Per-leaf squared norms, and how to finish the clipped sum given the factors."""

  sq_norms: list[jax.Array]
  finish: Callable[[list[jax.Array], jax.Array], list[jax.Array]]
  aux: Any
  vmapped: list[int]  # the leaves whose per-example gradients vmap formed


def _vmap_parts(
  flat: Callable[..., Any], leaves: list[Any], batch_leaves: list[Any], has_aux: bool
) -> _Parts:
  grads = _vmap_grads(flat, leaves, list(range(len(leaves))), batch_leaves)
  aux = flat(*leaves, *batch_leaves)[1] if has_aux else None

  def finish(c: list[jax.Array], keep: jax.Array) -> list[jax.Array]:
    return [
      _weighted_sum(ci, keep, g, x) for ci, g, x in zip(c, grads, leaves, strict=True)
    ]

  return _Parts([_sq_norms(g) for g in grads], finish, aux, list(range(len(leaves))))


def _ghost_parts(
  call: str,
  flat: Callable[..., Any],
  leaves: list[Any],
  batch_leaves: list[Any],
  b: int,
  analysis: _ghost.Analysis,
  closed: Any,
  out_tree: Any,
) -> _Parts:
  taps = {t.key: t for t in analysis.taps}
  zeros = {
    k: jnp.zeros(_ghost.probe_shape(t, b, stacked=True), _ghost.probe_dtype(t))
    for k, t in taps.items()
  }

  def forward(probes: dict[Any, jax.Array]) -> tuple[jax.Array, Any]:
    outs, records = _ghost.evaluate(closed, [*leaves, *batch_leaves], taps, probes)
    return outs[0], (outs[1:], records)

  losses, vjp, (aux_leaves, records) = jax.vjp(forward, zeros, has_aux=True)
  (out_grads,) = vjp(jnp.ones_like(losses))
  aux = jax.tree.unflatten(jax.tree.structure(out_tree), [losses, *aux_leaves])[1]

  n = len(leaves)
  sq = [jnp.zeros((b,), jnp.float32) for _ in range(n)]
  # Convolutions whose per-example kernel gradients are cheaper to form than
  # their Gram matrices keep them for the clipped sum, as explicit per-example
  # gradients (no second kernel-gradient convolution).
  formed = {
    k
    for k, t in taps.items()
    if t.kind == "conv" and _ghost.conv_method(t) == "explicit"
  }
  explicit: dict[int, jax.Array] = {}
  for key, tap in taps.items():
    g = out_grads[key]
    if tap.kind in ("dense", "embedding", "conv") and key not in formed:
      sq[tap.leaf] = sq[tap.leaf] + _ghost.tap_sq_norms(tap, records[key], g)
    else:
      if tap.kind == "conv":
        pe = lambda r, d, tap=tap: _ghost.conv_per_example(tap, r, d)
        per_operand = (jax.vmap(pe) if tap.scan else pe)(records[key], g)
      elif tap.kind == "broadcast":
        per_operand = _ghost.broadcast_per_example(tap, g)
      elif tap.scan is not None:  # stacked over the iterations
        per_operand = jax.vmap(
          lambda d, tap=tap: _ghost.elementwise_per_example(tap, d)
        )(g)
      else:
        per_operand = _ghost.elementwise_per_example(tap, g)
      per_leaf = _ghost.to_leaf_per_example(tap, leaves[tap.leaf], per_operand)
      prev = explicit.get(tap.leaf)
      explicit[tap.leaf] = per_leaf if prev is None else prev + per_leaf
  for leaf, g in explicit.items():
    sq[leaf] = _sq_norms(g)
  which = sorted(analysis.fallback)
  vmapped = (
    dict(zip(which, _vmap_grads(flat, leaves, which, batch_leaves), strict=True))
    if which
    else {}
  )
  for leaf, g in vmapped.items():
    sq[leaf] = _sq_norms(g)

  def finish(c: list[jax.Array], keep: jax.Array) -> list[jax.Array]:
    grads: list[Any] = [None] * n
    for key, tap in taps.items():
      if tap.kind in ("elementwise", "broadcast") or key in formed:
        continue
      g = out_grads[key]
      acc = _norms.accumulation_dtype(g.dtype)
      k = _ghost.tap_rows(tap, tap.batch_axis)
      weighted = g.astype(acc) * _ghost.expand_rows(c[tap.leaf].astype(acc), g, k)
      weighted = jnp.where(_ghost.expand_rows(keep, g, k), weighted, jnp.zeros((), acc))
      rec = records[key]
      if tap.kind in ("dense", "conv"):
        rec = jnp.where(
          _ghost.expand_rows(keep, rec, _ghost.tap_rows(tap, tap.act_batch_axis)),
          rec,
          jnp.zeros((), rec.dtype),
        )
      v_aval = tap.eqn.invars[key[-1]].aval
      transpose = lambda r, w, tap=tap, v_aval=v_aval: _ghost.weighted_transpose(
        tap, r, w, v_aval
      )
      if tap.scan is not None:
        transpose = jax.vmap(transpose)
      gv = transpose(rec, weighted)
      grads[tap.leaf] = _ghost.to_leaf(tap, leaves[tap.leaf], gv)
    for leaf, g in [*explicit.items(), *vmapped.items()]:
      grads[leaf] = _weighted_sum(c[leaf], keep, g, leaves[leaf])
    return [
      jnp.zeros_like(x) if g is None else g.astype(jnp.result_type(x))
      for g, x in zip(grads, leaves, strict=True)
    ]

  return _Parts(sq, finish, aux, which)


def _check_params(call: str, params: Any) -> tuple[list[Any], Any]:
  _norms.check_float_leaves(
    call, params, why="only floating-point parameters can be differentiated"
  )
  return jax.tree.flatten(params)


def _parts(
  call: str,
  loss_fn: Callable[..., Any],
  leaves: list[Any],
  params_def: Any,
  batch: Sequence[Any],
  method: str,
  has_aux: bool,
) -> _Parts:
  t = _trace(call, loss_fn, leaves, params_def, batch, has_aux, second=method != "vmap")
  if method == "vmap":
    return _vmap_parts(t.flat, leaves, t.batch_leaves, has_aux)
  try:
    analysis = _ghost.analyze(t.closed, t.closed2, len(leaves))
  except _ghost.StructureError as e:
    if method == "auto":
      return _vmap_parts(t.flat, leaves, t.batch_leaves, has_aux)
    raise ValueError(
      f"{call}(method='ghost'): loss_fn traces to different programs at batch"
      f" sizes {t.b} and {t.b + 1} ({e}); use method='vmap' or 'auto'."
    ) from e
  return _ghost_parts(
    call, t.flat, leaves, t.batch_leaves, t.b, analysis, t.closed, t.out_shape
  )


def _clipped_grad(
  call: str,
  loss_fn: Callable[..., Any],
  params: Any,
  batch: Sequence[Any],
  l2_clip: Any,
  method: str,
  microbatch_size: int | None,
  has_aux: bool,
  return_info: bool,
) -> Any:
  leaves, params_def = _check_params(call, params)
  bounds, groups, bound_def = _groups(call, l2_clip, params)
  b = _batch_size(call, batch)
  vmapped: set[int] = set()  # filled while tracing

  def one(chunk: Sequence[Any]) -> tuple[list[jax.Array], jax.Array, Any]:
    parts = _parts(call, loss_fn, leaves, params_def, chunk, method, has_aux)
    vmapped.update(parts.vmapped)
    size = _batch_size(call, chunk)
    group_sq = [jnp.zeros((size,), jnp.float32) for _ in bounds]
    for sq, gi in zip(parts.sq_norms, groups, strict=True):
      group_sq[gi] = group_sq[gi] + sq.astype(jnp.float32)
    norms = jnp.sqrt(jnp.stack(group_sq))
    keep = jnp.all(jnp.isfinite(norms), axis=0)
    factors = [
      jnp.where(keep, _norms.clip_scale(n, bound), jnp.zeros((), n.dtype))
      for n, bound in zip(norms, bounds, strict=True)
    ]
    grads = parts.finish([factors[g] for g in groups], keep)
    return grads, norms, parts.aux

  if microbatch_size is None or microbatch_size >= b:
    grads, norms, aux = one(batch)
  else:
    if b % microbatch_size:
      raise ValueError(
        f"{call}(microbatch_size={microbatch_size}) must divide the batch size {b}."
      )
    n_chunks = b // microbatch_size
    chunked = jax.tree.map(
      lambda x: x.reshape(n_chunks, microbatch_size, *x.shape[1:]), tuple(batch)
    )

    def body(total: list[jax.Array], chunk: Any) -> tuple[list[jax.Array], Any]:
      grads, norms, aux = one(chunk)
      total = [t + g.astype(t.dtype) for t, g in zip(total, grads, strict=True)]
      return total, (norms, aux)

    init = [
      jnp.zeros(jnp.shape(x), _norms.accumulation_dtype(jnp.result_type(x)))
      for x in leaves
    ]
    total, (norms, aux) = jax.lax.scan(body, init, chunked)
    grads = [t.astype(jnp.result_type(x)) for t, x in zip(total, leaves, strict=True)]
    norms = jnp.moveaxis(norms, 0, 1).reshape(len(bounds), b)
  grads_tree = jax.tree.unflatten(params_def, grads)
  norms_out = (
    norms[0] if bound_def is None else jax.tree.unflatten(bound_def, list(norms))
  )
  if return_info:
    num = jnp.sum(~jnp.all(jnp.isfinite(norms), axis=0), dtype=jnp.int32)
    names = _ghost.leaf_names(params)
    norms_out = PerExampleClipInfo(
      norms_out, num, tuple(names[i] for i in sorted(vmapped))
    )
  return (grads_tree, norms_out, aux) if has_aux else (grads_tree, norms_out)


def _plan(
  call: str,
  loss_fn: Callable[..., Any],
  params: Any,
  batch: Sequence[Any],
  has_aux: bool,
) -> dict[str, str]:
  leaves, params_def = _check_params(call, params)
  t = _trace(call, loss_fn, leaves, params_def, batch, has_aux, second=True)
  analysis = _ghost.analyze(t.closed, t.closed2, len(leaves))
  names = _ghost.leaf_names(params)
  return _ghost.describe(analysis, names)

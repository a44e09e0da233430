"""DiLoCo and Streaming DiLoCo: local inner steps, an outer step every H updates.

One more composition of the pieces ``compressed_mean`` is made of: an ``inner``
optax optimizer steps on each device's own gradient with no collective; every
``sync_every`` updates the pseudo-gradient ``anchor - local`` goes through the
same staged exchange (compressor, feedback, collective) or a plain ``pmean``,
and an ``outer`` optimizer moves the anchor. Streaming DiLoCo only changes
which leaves travel at which update. Public through ``clipjax.distributed``.
"""

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from clipjax import _norms
from clipjax._stats import labelled
from clipjax.compression import _exchange, _transform
from clipjax.compression._base import Compressor, check_choice, check_int
from clipjax.compression._compressors import cast
from clipjax.compression._feedback import Feedback, resolve_feedback

_CALL = "diloco"


@dataclasses.dataclass(frozen=True)
class DilocoStats:
  """What :func:`diloco` sent on its last update (zeros and ``-1`` before).

  A registered pytree whose name is static metadata, read with
  :func:`diloco_stats` wherever it sits in an optax state. Byte counts are
  one device's, by ring collectives (see
  :func:`~clipjax.distributed.exchange_bytes`), float32 (exact below
  ``2**24``).

  Attributes:
    bytes_sent: bytes this device sent on this update: the synced fragment's
      payloads on a sync, 0 between syncs.
    bytes_received: what it received on this update (as many as it sent: the
      ring collectives used are symmetric).
    bytes_per_step: the bytes sent per update averaged over a period of
      ``sync_every`` updates (every fragment synced once), whichever update
      this is.
    dense_bytes: what a dense float32 ring all-reduce of the whole gradient
      sends per update: data parallelism's cost.
    ratio: ``dense_bytes / bytes_per_step``.
    fragment: int32: the fragment synced on this update, ``-1`` for none.
    name: ``"diloco"`` (static).

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np, optax
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> from clipjax import distributed
    >>> mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    >>> tx = distributed.diloco(
    ...   optax.sgd(0.1), optax.sgd(1.0), sync_every=2, axis_name="data"
    ... )
    >>> @jax.jit
    ... @jax.shard_map(mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    ... def sent_per_update(w):
    ...   w = w[0]
    ...   state = tx.init(w)
    ...   sent = []
    ...   for _ in range(2):
    ...     u, state = tx.update(w, state, w)  # 4 float32s, plain pmean
    ...     sent.append(state.stats.bytes_sent)
    ...   return jnp.stack([*sent, state.stats.bytes_per_step, state.stats.ratio])[None]
    >>> print(sent_per_update(jnp.ones((8, 4)))[0])  # 2 (N-1)/N 16 bytes at a sync
    [ 0. 28. 14.  2.]
  """

  bytes_sent: jax.Array
  bytes_received: jax.Array
  bytes_per_step: jax.Array
  dense_bytes: jax.Array
  ratio: jax.Array
  fragment: jax.Array
  name: str = "diloco"


_FIELDS = (
  "bytes_sent",
  "bytes_received",
  "bytes_per_step",
  "dense_bytes",
  "ratio",
  "fragment",
)

jax.tree_util.register_dataclass(
  DilocoStats, data_fields=list(_FIELDS), meta_fields=["name"]
)


class DilocoState(NamedTuple):
  """State of :func:`diloco`: per device, so keep it with a device axis.

  Attributes:
    step: shape ``()``, int32: the updates so far.
    anchor: the parameters as of each fragment's last sync (the outer
      optimizer's parameters, the same on every device), a tree like the
      params. Between syncs it is the model to evaluate: every device's
      consensus.
    inner: the inner optimizer's state (per device; kept across syncs).
    outer: one outer optimizer state per fragment, each for the params tree
      with the other fragments' leaves masked out (``optax.MaskedNode``).
    exchange: one :class:`~clipjax.compression.CompressState` per fragment (the
      compressor's and feedback's state for the pseudo-gradient, with the
      statistics of that fragment's last sync), or ``()`` without a
      compressor.
    stats: the :class:`DilocoStats` of the last update.

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np, optax
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> from clipjax import compression, distributed
    >>> mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    >>> tx = distributed.diloco(
    ...   optax.sgd(0.5), optax.sgd(1.0), sync_every=3, axis_name="data",
    ...   compressor=compression.cast(jnp.bfloat16),
    ... )
    >>> params = {"w": jnp.zeros((8, 5))}
    >>> state = jax.eval_shape(tx.init, params)  # e.g. an orbax restore target
    >>> print(state.step.dtype, state.anchor["w"].shape, len(state.exchange))
    int32 (8, 5) 1
  """

  step: jax.Array  # shape=(), int32
  anchor: Any  # a tree like the params
  inner: Any
  outer: tuple[Any, ...]
  exchange: tuple[Any, ...]
  stats: DilocoStats


def diloco_stats(opt_state: Any) -> dict[str, jax.Array]:
  """Flattens every :class:`DilocoStats` in an optax state tree into a dict.

  The sibling of :func:`~clipjax.compression.compression_stats`, named the
  same way: ``"<labels>/diloco/<field>"``. The exchange's own statistics of
  each fragment's last sync (its compression ratio, residual norm) are in
  ``compression_stats`` of the same state.

  Args:
    opt_state: any optax state (or pytree holding one).

  Returns:
    A dict from names to scalars (float32, ``fragment`` int32).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from clipjax import distributed
    >>> tx = distributed.diloco(
    ...   optax.sgd(0.1), optax.sgd(1.0), sync_every=4, axis_name="data"
    ... )
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> {k: float(v) for k, v in distributed.diloco_stats(state).items()}
    {'diloco/bytes_sent': 0.0, 'diloco/bytes_received': 0.0,
     'diloco/bytes_per_step': 0.0, 'diloco/dense_bytes': 0.0, 'diloco/ratio': 0.0,
     'diloco/fragment': -1.0}
  """
  return {
    f"{base}/{field}": getattr(node, field)
    for base, node in labelled(opt_state, DilocoStats)
    for field in _FIELDS
  }


def fragment_cuts(sizes: Sequence[int], fragments: int) -> list[int]:
  """Where the leaves are cut into ``fragments`` contiguous runs.

  Returns ``[0, c_1, ..., len(sizes)]``: fragment ``f`` holds leaves
  ``c_f .. c_{f+1} - 1``. Each cut ``c_f`` is the leaf boundary whose running
  element count is nearest ``f / F`` of the total (the earlier on a tie),
  such that every fragment keeps at least one leaf.
  """
  n = len(sizes)
  prefix = np.cumsum([0, *sizes])
  total = float(prefix[-1])
  cuts = [0]
  for f in range(1, fragments):
    target = f * total / fragments
    choices = range(cuts[-1] + 1, n - (fragments - f) + 1)
    cuts.append(min(choices, key=lambda i: abs(float(prefix[i]) - target)))
  return [*cuts, n]


def _varying(tree: Any, axis_name: Any) -> Any:
  """``tree`` with every leaf typed as varying over ``axis_name``.

  Both branches of a ``lax.cond`` must give the same types; a collective's
  result is the same on every device, what it replaces is not.
  """
  if not _norms.tracks_varying(axis_name):
    return tree
  axes = _norms.mesh_axes(axis_name)

  def cast_one(x):
    missing = tuple(a for a in axes if a not in _norms.varying_axes(x))
    return lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(cast_one, tree)


def _per_device(tree: Any, axis_name: Any) -> Any:
  """``tree`` typed as varying over ``axis_name`` where that axis is bound.

  The state is per device: typed so from ``init`` on, it is a ``lax.scan``
  carry whose type the update keeps.
  """
  try:
    lax.axis_size(axis_name)
  except NameError:
    return tree
  return _varying(tree, axis_name)


def _check_transformation(name: str, tx: Any) -> None:
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(
      f"{_CALL}({name}={tx!r}) must be an optax.GradientTransformation"
      " (e.g. optax.adamw(1e-3) or optax.sgd(0.7, momentum=0.9, nesterov=True))."
    )


def diloco(
  inner: optax.GradientTransformation,
  outer: optax.GradientTransformation,
  *,
  sync_every: int,
  axis_name: Any,
  compressor: Compressor | None = None,
  feedback: str | Feedback | None = "error_feedback",
  fragments: int = 1,
  key: Any = None,
  exchange: str = "auto",
) -> optax.GradientTransformation:
  """DiLoCo: ``sync_every`` local steps of ``inner``, then an ``outer`` step.

  Use inside ``jax.shard_map`` over the data axis, as
  :func:`~clipjax.distributed.compressed_mean` is, with each device's own
  gradient and its own params, and the state per device (a leading device
  axis outside, ``P(axis_name)``, indexed away inside). The update needs the
  params: ``tx.update(grads, state, params)``.

  Every update, ``inner`` turns this device's gradient into a local update,
  with no collective. Update ``n`` (counted from 1) is a sync when ``n`` is a
  multiple of ``sync_every``: the pseudo-gradient ``anchor - local`` (the
  local params being ``params`` plus the inner update) is averaged over
  ``axis_name``, by a plain ``pmean`` without ``compressor``, or compressed
  with ``compressor`` and its ``feedback`` (residuals kept from sync to sync)
  and moved by the exchange ``compressed_mean`` would use; ``outer`` updates
  the anchor with that mean, and the update returned is ``new_anchor -
  params``, so that every device's params become the new anchor. Between
  syncs the devices' params differ. With ``sync_every=1``,
  ``inner=optax.sgd(lr)``, ``outer=optax.sgd(1.0)`` and no compressor it is
  data-parallel SGD.

  ``fragments=F`` is Streaming DiLoCo: the leaves (in ``jax.tree.leaves``
  order) are cut into ``F`` contiguous fragments of about equal element
  counts (each cut at the leaf boundary nearest ``f / F`` of the elements, at
  least one leaf each), and fragment ``f`` syncs on the updates ``n`` for
  which ``n - f * (sync_every // F)`` is a positive multiple of
  ``sync_every``: one fragment at a time, each once per ``sync_every``
  updates. Each fragment has its own outer state and exchange state; only
  the synced fragment's collective runs (it sits in that fragment's
  ``lax.cond`` branch), so the bytes of a sync are about ``1 / F`` of
  DiLoCo's, for the same bytes per update.

  The params then equal the new anchor up to the rounding of ``params +
  (new_anchor - params)``: bit for bit where the two are within a factor 2 of
  each other (Sterbenz's lemma), else within an ulp of the larger, so devices
  may differ by that ulp on some elements. ``state.anchor`` is the same on
  every device bit for bit: evaluate, compare and export it.

  Non-finite values: with a compressor, a sync at which any device's
  pseudo-gradient or decoded mean is not finite hands ``outer`` zeros (the
  exchange skips it, as ``compressed_mean`` skips a step); a plain ``pmean``
  spreads them. No update can repair params that have become non-finite, so
  guard the inner steps (``optax.apply_if_finite(inner, ...)`` or a clipjax
  skip guard): a bad gradient then stays on its device and out of the params.

  Args:
    inner: the local optimizer (e.g. ``optax.adamw(1e-3)``); its state is per
      device and kept across syncs.
    outer: the optimizer of the anchor, fed the averaged pseudo-gradient (e.g.
      ``optax.sgd(0.7, momentum=0.9, nesterov=True)``; ``optax.sgd(1.0)`` is
      plain model averaging).
    sync_every: ``H``, the updates between syncs (an int >= 1).
    axis_name: the mesh axis of the workers.
    compressor: ``None`` (a plain ``pmean`` of the pseudo-gradient in its
      dtype) or a :class:`~clipjax.compression.Compressor`.
    feedback: ``"error_feedback"`` (default), ``"ef21"``, ``None`` or a
      :class:`~clipjax.compression.Feedback` (e.g. ``error_feedback(decay=
      0.9)``): the compressor's feedback, as in ``compressed_mean``; unused
      without one.
    fragments: ``F``, an int from 1 to ``sync_every`` and at most the number
      of leaves (checked by ``init``).
    key: the base PRNG key of the compressor (``None`` is seed 0), the same on
      every device; fragment ``f > 0`` folds in ``f``.
    exchange: the compressor's exchange, as in ``compressed_mean``
      (``"auto"``, ``"psum"``, ``"all_gather"``, ``"reduce_scatter"``).

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`DilocoState`
    and whose statistics (:func:`diloco_stats`) count the bytes one device
    sends per sync and per update, against a dense float32 ring all-reduce
    every update.

  Raises:
    TypeError: ``inner`` or ``outer`` is not a transformation, or
      ``compressor`` not a compressor; at ``init``, a non-float leaf.
    ValueError: a bad ``sync_every``, ``fragments``, ``feedback``, ``key`` or
      ``exchange``; at ``init``, more fragments than leaves; at ``update``, no
      params, no mesh axis ``axis_name``, or a gradient that is the same on
      every device (see ``compressed_mean``).

  Examples:
    Device ``i`` pulls its parameter towards ``i`` by SGD; every 4 updates
    the devices average (``outer=sgd(1.0)``) and agree:

    >>> import jax, jax.numpy as jnp, numpy as np, optax
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> from clipjax import distributed
    >>> mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    >>> tx = distributed.diloco(
    ...   optax.sgd(0.1), optax.sgd(1.0), sync_every=4, axis_name="data"
    ... )
    >>> @jax.jit
    ... @jax.shard_map(mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    ... def train(target):
    ...   w = target[0] * 0.0  # this device's parameter
    ...   state = tx.init(w)
    ...   history = []
    ...   for _ in range(5):
    ...     grad = w - target[0]  # of (w - target)**2 / 2
    ...     update, state = tx.update(grad, state, w)
    ...     w = optax.apply_updates(w, update)
    ...     history.append(w)
    ...   return jnp.stack(history)[None]
    >>> history = train(jnp.arange(8.0))  # (device, update)
    >>> print(history[:, 2])  # after 3 updates, each its own: i (1 - 0.9**3)
    [0.    0.271 0.542 0.813 1.084 1.355 1.626 1.897]
    >>> print(history[:, 3])  # the 4th is a sync: the mean, 3.5 (1 - 0.9**4)
    [1.20365 1.20365 1.20365 1.20365 1.20365 1.20365 1.20365 1.20365]

  References:
    Douillard et al., `DiLoCo: distributed low-communication training of
    language models <https://arxiv.org/abs/2311.08105>`_, 2023; Douillard et
    al., `Streaming DiLoCo with overlapping communication
    <https://arxiv.org/abs/2501.18512>`_, 2025.
  """
  _check_transformation("inner", inner)
  _check_transformation("outer", outer)
  sync_every = check_int(_CALL, "sync_every", sync_every, 1)
  fragments = check_int(_CALL, "fragments", fragments, 1)
  if fragments > sync_every:
    raise ValueError(
      f"{_CALL}(fragments={fragments!r}) must be at most sync_every={sync_every}:"
      " fragments sync on distinct updates, sync_every // fragments apart."
    )
  if compressor is not None and not isinstance(compressor, Compressor):
    raise TypeError(f"{_CALL}(compressor={compressor!r}) must be a Compressor or None.")
  fb = resolve_feedback(_CALL, feedback)
  base_key = _transform.key_data(_CALL, key)
  offset = sync_every // fragments

  exchanges: list[optax.GradientTransformation] = []
  if compressor is not None:
    how = _exchange.resolve(_CALL, compressor, exchange)
    for f in range(fragments):
      exchanges.append(
        _transform.staged_transform(
          _CALL,
          compressor.name,
          [compressor],
          None,
          fb,
          base_key if f == 0 else jax.random.fold_in(base_key, f),
          exchange=lambda c: _exchange.leaf_exchange(c, axis_name, how),
          dense_bytes=_exchange.dense_bytes(axis_name),
          agree=_exchange.all_finite(axis_name),
        )
      )
  else:
    check_choice(_CALL, "exchange", exchange, _exchange.EXCHANGES)
    how = "psum"
  check_local = _exchange.check_local(_CALL, axis_name)

  def leaf_bytes(x: jax.Array, n: int) -> int:
    if x.size == 0:
      return 0
    c = compressor if compressor is not None else cast(x.dtype)
    return _exchange.exchange_bytes(c, x.shape, x.dtype, n, how)

  def cuts_of(leaves: list[Any]) -> list[int]:
    if fragments > len(leaves):
      raise ValueError(
        f"{_CALL}(fragments={fragments!r}) is more than the {len(leaves)} leaves"
        " of the params: a fragment is one or more whole leaves."
      )
    return fragment_cuts([int(np.prod(np.shape(x))) for x in leaves], fragments)

  def masked(treedef: Any, leaves: list[Any], lo: int, hi: int) -> Any:
    """The params tree with only leaves ``lo .. hi - 1`` (given), others masked."""
    n = treedef.num_leaves
    full = [optax.MaskedNode()] * lo + list(leaves) + [optax.MaskedNode()] * (n - hi)
    return jax.tree.unflatten(treedef, full)

  def init_fn(params):
    _norms.check_float_leaves(
      _CALL,
      params,
      real=True,
      why="DiLoCo needs floating-point params (mask integer leaves out)",
    )
    leaves, treedef = jax.tree.flatten(params)
    cuts = cuts_of(leaves)
    outer_states = tuple(
      outer.init(masked(treedef, leaves[lo:hi], lo, hi))
      for lo, hi in itertools.pairwise(cuts)
    )
    exchange_states = tuple(
      ex.init(leaves[lo:hi])
      for ex, (lo, hi) in zip(exchanges, itertools.pairwise(cuts), strict=False)
    )
    z = jnp.zeros((), jnp.float32)
    state = DilocoState(
      step=jnp.zeros((), jnp.int32),
      anchor=params,
      inner=inner.init(params),
      outer=outer_states,
      exchange=exchange_states,
      stats=DilocoStats(z, z, z, z, z, jnp.full((), -1, jnp.int32)),
    )
    return _per_device(state, axis_name)

  def sync_fragment(f: int, treedef: Any, lo: int, hi: int) -> Callable[..., Any]:
    """The branch that syncs fragment ``f`` (leaves ``lo .. hi - 1``)."""

    def sync(anchor, local, params, updates, outer_state, exchange_state):
      pseudo = [a - x for a, x in zip(anchor, local, strict=True)]
      if compressor is None:
        mean = lax.pmean(pseudo, axis_name)
      else:
        mean, exchange_state = exchanges[f].update(pseudo, exchange_state)
      outer_updates, outer_state = outer.update(
        masked(treedef, mean, lo, hi),
        outer_state,
        masked(treedef, anchor, lo, hi),
      )
      moved = optax.apply_updates(masked(treedef, anchor, lo, hi), outer_updates)
      anchor = jax.tree.leaves(moved)
      updates = [
        (a - p).astype(u.dtype) for a, p, u in zip(anchor, params, updates, strict=True)
      ]
      return _varying((updates, anchor, outer_state, exchange_state), axis_name)

    def wait(anchor, local, params, updates, outer_state, exchange_state):
      del local, params
      return _varying((updates, anchor, outer_state, exchange_state), axis_name)

    return lambda due, *args: lax.cond(due, sync, wait, *args)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
        f"{_CALL}: update needs the params, tx.update(grads, state, params): the"
        " pseudo-gradient is anchor - params, and a sync resets the params."
      )
    check_local(updates)
    n_devices = _exchange.axis_size(_CALL, axis_name)
    inner_updates, inner_state = inner.update(updates, state.inner, params)
    local = optax.apply_updates(params, inner_updates)
    leaves, treedef = jax.tree.flatten(params)
    cuts = cuts_of(leaves)
    anchor = jax.tree.leaves(state.anchor)
    local_leaves = jax.tree.leaves(local)
    out = jax.tree.leaves(inner_updates)
    new_anchor = list(anchor)
    outer_states, exchange_states = list(state.outer), list(state.exchange)
    n = state.step + 1
    sent = jnp.zeros((), jnp.float32)
    fragment = jnp.full((), -1, jnp.int32)
    per_period = 0
    for f, (lo, hi) in enumerate(itertools.pairwise(cuts)):
      since = n - f * offset
      due = (since > 0) & (since % sync_every == 0)
      ex_state = exchange_states[f] if compressor is not None else ()
      u, a, o, e = sync_fragment(f, treedef, lo, hi)(
        due,
        anchor[lo:hi],
        local_leaves[lo:hi],
        leaves[lo:hi],
        out[lo:hi],
        outer_states[f],
        ex_state,
      )
      out[lo:hi], new_anchor[lo:hi], outer_states[f] = u, a, o
      if compressor is not None:
        exchange_states[f] = e
      frag_bytes = sum(leaf_bytes(x, n_devices) for x in leaves[lo:hi])
      per_period += frag_bytes
      sent = sent + jnp.where(due, jnp.float32(frag_bytes), jnp.float32(0))
      fragment = jnp.where(due, jnp.int32(f), fragment)
    dense = float(_exchange.dense_bytes(axis_name)(leaves))
    per_step = per_period / sync_every
    stats = DilocoStats(
      bytes_sent=sent,
      bytes_received=sent,
      bytes_per_step=jnp.asarray(per_step, jnp.float32),
      dense_bytes=jnp.asarray(dense, jnp.float32),
      ratio=jnp.asarray(dense / per_step if per_step else 1.0, jnp.float32),
      fragment=fragment,
    )
    new_state = DilocoState(
      step=optax.safe_int32_increment(state.step),
      anchor=jax.tree.unflatten(treedef, new_anchor),
      inner=inner_state,
      outer=tuple(outer_states),
      exchange=tuple(exchange_states),
      stats=stats,
    )
    return jax.tree.unflatten(treedef, out), _varying(new_state, axis_name)

  return optax.GradientTransformation(init_fn, update_fn)

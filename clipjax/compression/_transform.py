"""``compress``: a compressor and its feedback as an optax transformation."""

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
from clipjax._checks import check_stacked_fits
from clipjax._layout import Layout, Stacked
from clipjax._stats import labelled
from clipjax.compression._base import Compressor, nbytes, wire
from clipjax.compression._feedback import Feedback, resolve_feedback


@dataclasses.dataclass(frozen=True)
class CompressionStats:
  """What a compressing transformation sent on its last update (zeros before).

  A registered pytree whose name is static metadata, so that
  :func:`compression_stats` can label it wherever it sits in an optax state.
  All fields are float32 scalars (byte counts are exact below ``2**24``; the
  compressor's ``payload_bytes`` gives exact Python ints at any size).

  Attributes:
    bytes_sent: payload bytes of the whole update tree; across devices, the
      bytes one device sends per step by the exchange's ring collectives.
    bytes_received: the bytes the receiver gets: on one process the payload;
      across devices, what one device receives per step (for the symmetric
      ring collectives used, as many as it sends).
    dense_bytes: bytes of the update sent uncompressed.
    ratio: ``dense_bytes / bytes_sent``, the compression ratio.
    density: the fraction of the update's elements that are nonzero.
    residual_norm: the L2 norm of what the receiver has not yet got: the
      residual carried to the next step (error feedback, DGC), the gradient
      minus the new estimate (EF21), or minus the update (no feedback).
    name: the compressor's name (static).

  Across devices (``compressed_mean``, ``dgc(axis_name=...)``),
  ``residual_norm`` is each device's own, so it leaves ``shard_map`` with a
  device axis (``out_specs=P(axis)`` after ``[None]``) or reduced first
  (``jax.lax.pmax``); the other fields are the same on every device and may
  leave as ``P()``. ``density`` is then that of the averaged update: ``N``
  devices' sparse picks give up to ``N`` times the compressor's ratio.

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipjax import compression
    >>> tx = compression.compress(compression.sign())
    >>> g = {"w": jnp.linspace(-1.0, 2.0, 16)}  # 64 bytes of float32
    >>> _, state = tx.update(g, tx.init(g))
    >>> s = state.stats  # 2 bytes of packed signs and a float32 scale
    >>> print(s.name, s.bytes_sent, s.dense_bytes, s.ratio, s.density)
    sign 6.0 64.0 10.666667 1.0
  """

  bytes_sent: jax.Array
  bytes_received: jax.Array
  dense_bytes: jax.Array
  ratio: jax.Array
  density: jax.Array
  residual_norm: jax.Array
  name: str = "compress"


_FIELDS = (
  "bytes_sent",
  "bytes_received",
  "dense_bytes",
  "ratio",
  "density",
  "residual_norm",
)

jax.tree_util.register_dataclass(
  CompressionStats, data_fields=list(_FIELDS), meta_fields=["name"]
)


class CompressState(NamedTuple):
  """State of :func:`compress` and :func:`dgc`.

  Attributes:
    step: shape ``()``, int32: the updates so far. Step ``t`` folds ``t`` into
      ``key``, then each leaf's index, to give that leaf its key.
    key: the base key as raw ``uint32`` key data (``jax.random.key_data``).
    compressor: the per-leaf compressor states (``()`` for stateless
      compressors; PowerSGD's ``Q``), stacked by groups of leaves of one
      shape and dtype: a ``Stacked`` whose ``groups`` hold one array per
      group and field, so that the state's arrays do not grow with the
      number of leaves. ``state.compressor["w"]`` and
      ``state.compressor.tree()`` read it as a tree like the updates.
    feedback: the per-leaf feedback states, stacked the same way: the
      residual (error feedback), the running estimate (EF21), the momentum and
      accumulated velocity (DGC), or ``()`` without feedback. Float32 for
      half-precision leaves.
    stats: the :class:`CompressionStats` of the last update (zeros before).

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipjax import compression
    >>> tx = compression.compress(compression.top_k(0.5), key=0)
    >>> g = {"w": jnp.array([1.0, -4.0, 2.0, 3.0])}
    >>> state = tx.init(g)
    >>> print(state.step, state.key, state.compressor["w"])
    0 [0 0] ()
    >>> _, state = tx.update(g, state)
    >>> print(state.step, state.feedback["w"])  # what top-k left behind
    1 [1. 0. 2. 0.]
  """

  step: jax.Array  # shape=(), int32
  key: jax.Array  # uint32 key data
  compressor: Any  # a tree like the updates
  feedback: Any  # a tree like the updates
  stats: CompressionStats


def key_data(call: str, key: Any) -> jax.Array:
  """Raw ``uint32`` key data from ``None`` (seed 0), an int seed, or a key."""
  if key is None:
    key = 0
  if isinstance(key, int | np.integer) and not isinstance(key, bool):
    return jax.random.PRNGKey(int(key))
  try:
    arr = jnp.asarray(key)
  except TypeError as e:
    raise ValueError(
      f"{call}(key={key!r}) must be None, an int seed or a PRNG key."
    ) from e
  if jax.dtypes.issubdtype(arr.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(arr)
  if arr.dtype != jnp.uint32:
    raise ValueError(f"{call}(key={key!r}) must be None, an int seed or a PRNG key.")
  return arr


def _check_leaves(call: str, tree: Any) -> None:
  _norms.check_float_leaves(
    call,
    tree,
    real=True,
    why=(
      "compression needs floating-point updates (mask integer leaves out with"
      " optax.masked)"
    ),
  )


def _skip_unless(
  ok: jax.Array, layout: Layout, new: tuple[Any, Any, Any], old: tuple[Any, Any]
) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
  """``new`` (updates, compressor and feedback states) where ``ok``, else zero
  updates and the ``old`` states; and each leaf's row in its group.

  The rows come out of a ``lax.cond`` on ``ok`` (``j`` when kept; 0 when
  skipped, a row of zeros like any other), so XLA cannot fold them into
  constants: the kernel that reads a leaf's row out of its group is then the
  same for every leaf of the group, and XLA:CPU compiles it once, not once
  per leaf (on a GPT-2 tree, 148 kernels become 9). ``ok`` comes out of the
  cond too, so that each leaf's reader tests one flag instead of recomputing
  it from every group's, and the rows are unsigned, so that reading one needs
  no test for a negative index. The arrays go through ``where``, which XLA
  fuses into their readers (a ``cond`` over them would write each group's
  decoded update out and copy it: a slower step).
  """
  rows = [range(len(idx)) for idx in layout.groups]
  ok, got = jax.lax.cond(
    ok,
    lambda: (jnp.array(True), [[jnp.uint32(j) for j in r] for r in rows]),
    lambda: (jnp.array(False), [[jnp.uint32(0) for _ in r] for r in rows]),
  )
  outs, cs, fs = new
  zeros = [lax.select(ok, o, jnp.zeros_like(o)) for o in outs]
  return zeros, _keep_if(ok, cs, old[0]), _keep_if(ok, fs, old[1]), got


def _keep_if(ok: jax.Array, new: list[Any], old: list[Any]) -> list[Any]:
  """``new`` where ``ok``, else ``old``, leaf by leaf."""
  return [
    jax.tree.map(lambda n, o: lax.select(ok, n, o), a, b)
    for a, b in zip(new, old, strict=True)
  ]


def _finite_and_nonzero(
  groups: list[jax.Array], outs: list[jax.Array]
) -> tuple[jax.Array, jax.Array]:
  """Whether every gradient and decoded update is finite, and how many entries
  of the updates are nonzero (float32): one variadic reduction per group (as
  two, XLA:CPU compiles each its own tree of kernels)."""

  def combine(a, b):
    return lax.min(a[0], b[0]), a[1] + b[1]

  finite, nonzero = jnp.array(True), jnp.zeros((), jnp.float32)
  for g, o in zip(groups, outs, strict=True):
    flags = (jnp.isfinite(g) & jnp.isfinite(o)).astype(jnp.int32)
    counts = (o != 0).astype(jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    ok, count = lax.reduce(
      (flags, counts), (jnp.ones((), jnp.int32), zero), combine, tuple(range(g.ndim))
    )
    finite = finite & (ok > 0)
    nonzero = nonzero + count.astype(jnp.float32)
  return finite, nonzero


def _zero_stats(name: str) -> CompressionStats:
  z = jnp.zeros((), jnp.float32)
  return CompressionStats(z, z, z, z, z, z, name)


class Transport(NamedTuple):
  """How the leaves travel between workers (``clipjax.distributed``).

  ``nbytes(shape, dtype)``: the bytes one device sends for a leaf. Either
  ``run(x, cstate, key) -> (local_hat, mean_hat, cstate)`` does one leaf's
  whole exchange, or three steps do every leaf's at once: ``local(x, cstate,
  key) -> (payload, local_hat, cstate)`` per leaf, ``collective(payloads)``
  over the list of every group's payloads, ``mean(received, x, cstate, key)
  -> mean_hat`` per leaf.
  """

  nbytes: Callable[[tuple[int, ...], Any], int]
  run: Callable[..., tuple[jax.Array, jax.Array, Any]] | None = None
  local: Callable[..., tuple[Any, jax.Array, Any]] | None = None
  collective: Callable[[list[Any]], list[Any]] | None = None
  mean: Callable[..., jax.Array] | None = None


def _run_stage(
  compressor: Compressor,
  feedback: Feedback,
  layout: Layout,
  groups: list[jax.Array],
  cgroups: list[Any],
  fgroups: list[Any],
  keys: list[jax.Array],
  transport: Transport | None = None,
) -> tuple[list[jax.Array], list[Any], list[Any], list[jax.Array]]:
  """Compresses every group of leaves; returns updates, states and missing parts.

  Each group (the leaves of one shape and dtype, stacked) runs the per-leaf
  pipeline under ``jax.vmap``, so every leaf is compressed on its own as
  before, but the program holds one copy of the pipeline per group. Without
  ``transport``, the update is ``decode(encode(x))`` and the bytes are the
  payload's; ``transport.run`` replaces that step with a collective one
  (``clipjax.distributed``).
  """

  def finish(g, fs, local_hat, mean_hat):
    if feedback.name != "none":
      # Ask XLA to materialize the update before the residual is taken from it:
      # a product fused with the subtraction (an FMA, a GEMM epilogue) would make
      # the residual differ from (g + e) - update by a rounding. XLA:CPU drops
      # the barrier; there, decoders whose products are exact (qsgd's scales)
      # or absent keep the residual exact.
      local_hat = jax.lax.optimization_barrier(local_hat)
    return feedback.finish(g, fs, local_hat, mean_hat)

  def one(g, cs, fs, key):
    x = feedback.prepare(g, fs)
    if transport is not None:
      assert transport.run is not None
      local_hat, mean_hat, cs = transport.run(x, cs, key)
    else:
      payload, cs = compressor.encode(x, cs, key)
      claimed = compressor.payload_bytes(g.shape, g.dtype)
      if nbytes(payload) != claimed:
        raise ValueError(
          f"compressor {compressor.name!r} claims {claimed} payload bytes for"
          f" shape {g.shape} {g.dtype} but its payload holds {nbytes(payload)}."
        )
      local_hat = compressor.decode(wire(payload), g.shape, g.dtype, cs, key)
      mean_hat = local_hat  # on one process, the mean is this worker's own
    out, fs, miss = finish(g, fs, local_hat, mean_hat)
    return out, cs, fs, miss

  args = list(zip(groups, cgroups, fgroups, keys, strict=True))
  if transport is None or transport.run is not None:
    results = [jax.vmap(one)(*a) for a in args]
  else:
    assert transport.local and transport.collective and transport.mean
    local, mean = transport.local, transport.mean

    def send(g, cs, fs, key):
      x = feedback.prepare(g, fs)
      payload, local_hat, cs = local(x, cs, key)
      return x, payload, local_hat, cs

    sent = [jax.vmap(send)(*a) for a in args]
    received = transport.collective([s[1] for s in sent])

    def receive(g, fs, x, local_hat, got, cs, key):
      out, fs, miss = finish(g, fs, local_hat, mean(got, x, cs, key))
      return out, cs, fs, miss

    results = [
      jax.vmap(receive)(g, fs, x, local_hat, got, cs, key)
      for (g, _, fs, key), (x, _, local_hat, cs), got in zip(
        args, sent, received, strict=True
      )
    ]
  outs = [r[0] for r in results]
  new_c = [r[1] for r in results]
  new_f = [r[2] for r in results]
  missing = [r[3] for r in results]
  return outs, new_c, new_f, missing


def _leaf_keys(step_key: jax.Array, layout: Layout) -> list[jax.Array]:
  """Each group's keys: leaf ``i`` is given ``fold_in(step_key, i)``.

  One ``fold_in`` over every leaf, in group order, then a static slice per
  group: one threefry in the program, not one per group.
  """
  order = [i for idx in layout.groups for i in idx]
  if not order:
    return []
  keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(
    jnp.asarray(order, jnp.uint32)
  )
  bounds = np.cumsum([0, *(len(idx) for idx in layout.groups)])
  return [keys[a:b] for a, b in itertools.pairwise(bounds)]


def _run_bytes(compressor: Compressor, transport: Any, layout: Layout) -> int:
  """The bytes one step sends: each non-empty leaf's, from its shape."""
  per_leaf = compressor.payload_bytes if transport is None else transport.nbytes
  return sum(
    len(idx) * per_leaf(layout.group_shape(i), layout.group_dtype(i))
    for i, idx in enumerate(layout.groups)
  )


def staged_transform(
  call: str,
  name: str,
  stages: Sequence[Compressor],
  stage_of: Callable[[jax.Array], jax.Array] | None,
  feedback: Feedback,
  key: Any,
  *,
  exchange: Callable[[Compressor], Transport] | None = None,
  dense_bytes: Callable[[list[jax.Array]], float] | None = None,
  check: Callable[[Any], Any] | None = None,
  agree: Callable[[jax.Array], jax.Array] | None = None,
) -> optax.GradientTransformation:
  """The transformation behind :func:`compress`, :func:`dgc` and
  ``clipjax.distributed.compressed_mean``.

  ``stage_of(step)`` picks which of ``stages`` (compressors with the same state
  structure, e.g. top-k at several ratios) runs this step, through
  ``lax.switch``: each stage has its own static payload size. ``exchange``
  (``exchange(compressor)`` is :func:`_run_stage`'s) makes it a multi-worker
  transformation: feedback then
  keeps what EF21 shares between workers, ``dense_bytes(leaves)`` gives the
  bytes the uncompressed exchange would move, ``check(updates)`` runs first
  in every update (to raise a clear error outside the right context, or for
  a gradient that is not a local one), and
  ``agree(finite)`` makes every worker skip a step that any worker must skip.

  A step whose gradient or decoded update is not finite is skipped: the update
  is zeros and the compressor and feedback states are kept as they were (the
  step counter still advances). A state that ``init`` made for another tree
  (other leaves or shapes) raises ``ValueError`` naming ``call`` and the first
  leaf that differs, at trace time.
  """
  base_key = key_data(call, key)
  distributed = exchange is not None

  def init_fn(params):
    _check_leaves(call, params)
    layout = Layout.of(params)
    stacked = layout.stack(jax.tree.leaves(params))
    cgroups, fgroups = [], []
    for i, xs in enumerate(stacked):
      one = stages[0].init(layout.group_shape(i), layout.group_dtype(i))
      n = len(layout.groups[i])
      cgroups.append(
        jax.tree.map(lambda a, n=n: jnp.broadcast_to(a, (n, *jnp.shape(a))), one)
      )
      fgroups.append(jax.vmap(lambda x: feedback.init(x, distributed))(xs))
    return CompressState(
      step=jnp.zeros((), jnp.int32),
      key=base_key,
      compressor=Stacked.of(cgroups, layout),
      feedback=Stacked.of(fgroups, layout),
      stats=_zero_stats(name),
    )

  def check_fits(updates, layout, state):
    """A state made by init for these updates' shapes, or a clear error."""
    for what in ("feedback", "compressor"):
      # On a mismatch only: what init would make, per leaf, for these updates.
      def expected(what=what):
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), updates)
        return getattr(jax.eval_shape(init_fn, shapes), what).tree()

      check_stacked_fits(
        call, f"state's {what}", getattr(state, what, None), layout, updates, expected
      )

  def update_fn(updates, state, params=None):
    del params
    if check is not None:
      check(updates)
    _check_leaves(call, updates)
    layout = Layout.of(updates)
    check_fits(updates, layout, state)
    leaves = jax.tree.leaves(updates)
    groups = layout.stack(leaves)
    keys = _leaf_keys(jax.random.fold_in(state.key, state.step), layout)
    transports = [None if exchange is None else exchange(c) for c in stages]

    def branch(s):
      return lambda cs, fs: _run_stage(
        stages[s], feedback, layout, groups, cs, fs, keys, transports[s]
      )

    old_c, old_f = state.compressor.groups, state.feedback.groups
    sent_by_stage = [
      _run_bytes(c, t, layout) for c, t in zip(stages, transports, strict=True)
    ]
    if stage_of is None or len(stages) == 1:
      outs, cgroups, fgroups, missing = branch(0)(old_c, old_f)
      sent = jnp.asarray(sent_by_stage[0], jnp.float32)
    else:
      index = stage_of(state.step)
      outs, cgroups, fgroups, missing = jax.lax.switch(
        index, [branch(s) for s in range(len(stages))], old_c, old_f
      )
      sent = jnp.asarray(sent_by_stage, jnp.float32)[index]
    # A non-finite gradient (or decoded update) must not reach the residuals,
    # estimates or factors, where it would stay for good: the step is skipped.
    finite, nonzero = _finite_and_nonzero(groups, outs)
    if agree is not None:
      finite = agree(finite)
    outs, cgroups, fgroups, rows = _skip_unless(
      finite, layout, (outs, cgroups, fgroups), (old_c, old_f)
    )
    total = sum(int(g.size) for g in leaves)
    if dense_bytes is None:
      dense = float(sum(int(g.size) * g.dtype.itemsize for g in leaves))
    else:
      dense = float(dense_bytes(leaves))
    stats = CompressionStats(
      bytes_sent=sent,
      bytes_received=sent,
      dense_bytes=jnp.asarray(dense, jnp.float32),
      ratio=jnp.where(sent > 0, dense / jnp.maximum(sent, 1.0), 1.0),
      density=lax.select(finite, nonzero, jnp.zeros_like(nonzero)) / max(total, 1),
      residual_norm=_norms.global_norm(missing).astype(jnp.float32),
      name=name,
    )
    new_state = CompressState(
      step=optax.safe_int32_increment(state.step),
      key=state.key,
      compressor=Stacked.of(cgroups, layout),
      feedback=Stacked.of(fgroups, layout),
      stats=stats,
    )
    new = layout.unstack(outs, leaves, rows=rows)  # empty leaves pass through
    return jax.tree.unflatten(layout.treedef, new), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def compress(
  compressor: Compressor,
  *,
  feedback: str | Feedback | None = "error_feedback",
  key: Any = None,
) -> optax.GradientTransformation:
  """Compresses each leaf of the update and returns exactly what decoding gives.

  On one process this is the whole wire: for each leaf, the feedback forms the
  array to send, the compressor encodes it into its payload, and the update is
  ``decode(payload)`` (for EF21, the running estimate plus it), so training
  sees precisely what a receiver would. The statistics count the payload's
  bytes.

  Keys: step ``t``'s leaf ``i`` (in ``jax.tree.leaves`` order) is given
  ``fold_in(fold_in(key, t), i)``; workers that share ``key`` thus share
  random-k's indices.

  Args:
    compressor: a :class:`Compressor`, e.g. ``top_k(0.01)``.
    feedback: ``"error_feedback"`` (default: compress ``g + e``, keep the
      residual ``e``), ``"ef21"`` (compress the change of a running estimate),
      ``None``, or a :class:`Feedback` (e.g. ``error_feedback(decay=0.999)``,
      DeMo's decaying momentum). Error feedback wants a contraction (top-k,
      sign, PowerSGD, ``random_k(..., unbiased=False)``); unbiased compressors
      whose variance exceeds the gradient's own (random-k scaled, TernGrad on
      large leaves) can make the residual grow: use them without feedback.
    key: the base PRNG key: ``None`` (seed 0), an int seed, or a key.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`CompressState`
    (its ``stats`` a :class:`CompressionStats`, read with
    :func:`compression_stats`). Feedback state is float32 for half-precision
    leaves; updates keep their dtype.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from clipjax import compression
    >>> tx = compression.compress(compression.top_k(0.5))
    >>> g = {"w": jnp.array([1.0, -4.0, 2.0, 3.0])}
    >>> u, state = tx.update(g, tx.init(g))
    >>> print(u["w"], state.feedback["w"])
    [ 0. -4.  0.  3.] [1. 0. 2. 0.]
    >>> u, state = tx.update(g, state)  # the residual is added back
    >>> print(u["w"], state.feedback["w"])
    [ 0. -4.  4.  0.] [2. 0. 0. 3.]
    >>> {k: float(v) for k, v in compression.compression_stats(state).items()}
    {'top_k/bytes_sent': 16.0, 'top_k/bytes_received': 16.0,
     'top_k/dense_bytes': 16.0, 'top_k/ratio': 1.0, 'top_k/density': 0.5,
     'top_k/residual_norm': 3.605...}

  References:
    Karimireddy et al., `Error feedback fixes SignSGD and other gradient
    compression schemes <https://arxiv.org/abs/1901.09847>`_, 2019.
  """
  call = "compress"
  if not isinstance(compressor, Compressor):
    raise TypeError(f"{call}(compressor={compressor!r}) must be a Compressor.")
  fb = resolve_feedback(call, feedback)
  return staged_transform(call, compressor.name, [compressor], None, fb, key)


def compression_stats(opt_state: Any) -> dict[str, jax.Array]:
  """Flattens every compressor's statistics in an optax state tree into a dict.

  The sibling of :func:`~clipjax.clip_stats`, with the same naming:
  ``"<labels>/<compressor>/<field>"``, the labels being the string keys on the
  way down (``named_chain`` names, ``multi_transform`` labels); a name that
  repeats gets ``_1``, ``_2``, ...

  Args:
    opt_state: any optax state (or pytree holding one).

  Returns:
    A dict from names to float32 scalars, ready for a logger.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from clipjax import compression
    >>> tx = optax.named_chain(
    ...   ("wire", compression.compress(compression.sign(), feedback=None)),
    ...   ("sgd", optax.sgd(0.1)),
    ... )
    >>> g = {"w": jnp.ones((64,))}
    >>> _, state = tx.update(g, tx.init(g))
    >>> stats = compression.compression_stats(state)
    >>> print(stats["wire/sign/bytes_sent"], stats["wire/sign/ratio"])
    12.0 21.333334
  """
  return {
    f"{base}/{field}": getattr(node, field)
    for base, node in labelled(opt_state, CompressionStats)
    for field in _FIELDS
  }

"""Feedback: the per-leaf state kept beside a compressor (error feedback, EF21, DGC).

A :class:`Feedback` decides what the compressor is handed and what the update
becomes once the decoded estimate is known. It sees one leaf at a time, and
both this worker's own decoded contribution (``local_hat``) and the decoded
mean over workers (``mean_hat``); on one process the two are the same array.

State is kept in float32 for half-precision leaves (float64 for float64), so
that what rounding to the leaf's dtype drops is fed back too; the compressor is
always handed an array of the leaf's dtype.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from clipjax.compression._base import check_unit, compute_dtype


@dataclasses.dataclass(frozen=True)
class Feedback:
  """How the compressor's input and the update are formed, with per-leaf state.

  Attributes:
    name: ``"error_feedback"``, ``"ef21"``, ``"dgc"`` or ``"none"``.
    init: ``init(leaf, distributed) -> state`` for one leaf. ``distributed``
      asks EF21 to also keep the estimate shared by all workers.
    prepare: ``prepare(g, state) -> x``: the array to compress, in ``g``'s dtype.
    finish: ``finish(g, state, local_hat, mean_hat) -> (update, state, missing)``:
      ``missing`` is what the receiver has not yet got (the residual carried to
      the next step, or the estimate's error), for statistics.

  Examples:
    One leaf's pass through :func:`compress` on one process, where this
    worker's decoded contribution is also the decoded mean:

    >>> import jax.numpy as jnp
    >>> from clipjax import compression
    >>> fb, c = compression.error_feedback(), compression.top_k(0.5)
    >>> g = jnp.array([1.0, -4.0, 2.0, 3.0])
    >>> state = fb.init(g, False)
    >>> x = fb.prepare(g, state)
    >>> payload, cstate = c.encode(x, c.init(x.shape, x.dtype), None)
    >>> x_hat = c.decode(payload, x.shape, x.dtype, cstate, None)
    >>> update, state, missing = fb.finish(g, state, x_hat, x_hat)
    >>> print(fb.name, update, state)
    error_feedback [ 0. -4.  0.  3.] [1. 0. 2. 0.]
  """

  name: str
  init: Callable[[Any, bool], Any]
  prepare: Callable[[jax.Array, Any], jax.Array]
  finish: Callable[
    [jax.Array, Any, jax.Array, jax.Array], tuple[jax.Array, Any, jax.Array]
  ]


def _zeros(leaf: Any) -> jax.Array:
  return jnp.zeros(leaf.shape, compute_dtype(leaf.dtype))


def _wide(x: jax.Array) -> jax.Array:
  return x.astype(compute_dtype(x.dtype))


def no_feedback() -> Feedback:
  """The update is the decoded estimate; nothing is kept.

  Returns:
    A :class:`Feedback` with state ``()``; what the compressor drops is lost.

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipjax import compression
    >>> fb, c = compression.no_feedback(), compression.top_k(0.5)
    >>> g = jnp.array([1.0, -4.0, 2.0, 3.0])
    >>> state = fb.init(g, False)
    >>> g_hat, _, _ = c.roundtrip(fb.prepare(g, state), (), None)  # top-k: no state
    >>> update, state, missing = fb.finish(g, state, g_hat, g_hat)
    >>> print(update, state, missing)  # the same entries are dropped every step
    [ 0. -4.  0.  3.] () [1. 0. 2. 0.]
  """

  def init(leaf, distributed):
    del leaf, distributed
    return ()

  def prepare(g, state):
    del state
    return g

  def finish(g, state, local_hat, mean_hat):
    return mean_hat, state, _wide(g) - _wide(local_hat)

  return Feedback("none", init, prepare, finish)


def error_feedback(decay: float = 1.0) -> Feedback:
  """Adds back what was not sent: compress ``a = g + decay * e``, keep ``a - a_hat``.

  The residual is the rounded difference ``a - a_hat`` in the state's dtype, so
  ``a_hat + e == a`` holds bitwise whenever ``a_hat`` is 0 or within a factor 2
  of ``a`` elementwise (sparsifiers, casts, natural compression; Sterbenz's
  lemma), and to half an ulp of ``e`` otherwise.

  With ``decay < 1`` the residual is a momentum that decays by ``decay`` each
  step, from which each step sends what the compressor keeps: DeMo's
  decoupled momentum (``m = beta * m + g``, send ``C(m)``, ``m -= C(m)``;
  :func:`clipjax.distributed.demo`). ``decay=0`` keeps nothing.

  Args:
    decay: the factor the residual is multiplied by before the gradient is
      added, a Python number in [0, 1]; 1 (the default) is plain error
      feedback.

  Returns:
    A :class:`Feedback` whose state is the residual ``e``, zeros at first.

  Examples:
    Nothing is lost: what is sent plus the new residual is the gradient plus
    the old residual, and a dropped entry goes out once it has grown.

    >>> import jax.numpy as jnp
    >>> from clipjax import compression
    >>> fb, c = compression.error_feedback(), compression.top_k(0.5)
    >>> g = jnp.array([1.0, -4.0, 2.0, 3.0])
    >>> e = fb.init(g, False)
    >>> for _ in range(2):
    ...   a_hat, _, _ = c.roundtrip(fb.prepare(g, e), (), None)  # C(g + e)
    ...   update, new_e, _ = fb.finish(g, e, a_hat, a_hat)
    ...   print(update, new_e, bool(jnp.all(update + new_e == g + e)))
    ...   e = new_e
    [ 0. -4.  0.  3.] [1. 0. 2. 0.] True
    [ 0. -4.  4.  0.] [2. 0. 0. 3.] True

    With a decay, what waits fades: the 2 kept back at the first step is worth
    ``0.25 * 2 + 2 = 2.5`` at the second (4 without the decay), too little to
    be sent ahead of the 3.

    >>> fb = compression.error_feedback(decay=0.25)
    >>> e = fb.init(g, False)
    >>> for _ in range(2):
    ...   a_hat, _, _ = c.roundtrip(fb.prepare(g, e), (), None)  # C(g + e / 4)
    ...   update, e, _ = fb.finish(g, e, a_hat, a_hat)
    ...   print(update, e)
    [ 0. -4.  0.  3.] [1. 0. 2. 0.]
    [ 0. -4.  0.  3.] [1.25 0.   2.5  0.  ]

  References:
    Seide et al., 1-bit stochastic gradient descent and its application to
    data-parallel distributed training of speech DNNs, 2014; Stich, Cordonnier
    and Jaggi, `Sparsified SGD with memory <https://arxiv.org/abs/1809.07599>`_,
    2018; Peng, Quesnelle and Kingma, `DeMo: decoupled momentum optimization
    <https://arxiv.org/abs/2411.19870>`_, 2024.
  """
  decay = check_unit("error_feedback", "decay", decay)

  def init(leaf, distributed):
    del distributed
    return _zeros(leaf)

  def corrected(g, e):
    if decay != 1.0:
      e = decay * e
    return _wide(g) + e

  def prepare(g, e):
    return corrected(g, e).astype(g.dtype)

  def finish(g, e, local_hat, mean_hat):
    residual = corrected(g, e) - _wide(local_hat)
    return mean_hat, residual, residual

  return Feedback("error_feedback", init, prepare, finish)


def ef21() -> Feedback:
  """EF21: compress the change of a running estimate; the update is the estimate.

  Each worker keeps ``h`` and sends ``c = C(g - h)``; then ``h += c`` and the
  update is the shared estimate plus the mean of the ``c``. On one process the
  shared estimate is ``h`` itself, so the state is ``h`` alone; with
  ``distributed=True`` it is ``{"estimate": h, "shared": h_shared}``.

  Returns:
    A :class:`Feedback` whose state is ``{"estimate": h}``, zeros at first.

  Examples:
    A constant gradient: the estimate reaches it once its error fits in what
    one step sends, and from then on nothing more needs sending.

    >>> import jax.numpy as jnp
    >>> from clipjax import compression
    >>> fb, c = compression.ef21(), compression.top_k(0.5)
    >>> g = jnp.array([1.0, -4.0, 2.0, 3.0])
    >>> state = fb.init(g, False)
    >>> for _ in range(3):
    ...   sent, _, _ = c.roundtrip(fb.prepare(g, state), (), None)  # C(g - h)
    ...   update, state, _ = fb.finish(g, state, sent, sent)
    ...   print(sent, update)
    [ 0. -4.  0.  3.] [ 0. -4.  0.  3.]
    [1. 0. 2. 0.] [ 1. -4.  2.  3.]
    [0. 0. 0. 0.] [ 1. -4.  2.  3.]

  References:
    Richtarik, Sokolov and Fatkhullin, `EF21: a new, simpler, theoretically
    better, and practically faster error feedback
    <https://arxiv.org/abs/2106.05203>`_, 2021.
  """

  def init(leaf, distributed):
    if distributed:
      return {"estimate": _zeros(leaf), "shared": _zeros(leaf)}
    return {"estimate": _zeros(leaf)}

  def prepare(g, state):
    return (_wide(g) - state["estimate"]).astype(g.dtype)

  def finish(g, state, local_hat, mean_hat):
    estimate = state["estimate"] + _wide(local_hat)
    new = {"estimate": estimate}
    shared = state.get("shared", state["estimate"]) + _wide(mean_hat)
    if "shared" in state:
      new["shared"] = shared
    return shared.astype(g.dtype), new, _wide(g) - estimate

  return Feedback("ef21", init, prepare, finish)


def dgc_momentum(momentum: float) -> Feedback:
  """DGC's momentum correction and momentum factor masking around error feedback.

  The state is ``(u, v)``: ``u = momentum * u + g`` accumulates momentum
  locally, ``v += u`` is what gets compressed; after sending, ``v`` keeps the
  residual and both ``u`` and ``v`` are zeroed where this worker sent something
  (``local_hat != 0``). The momentum is thus inside the update: follow it with
  plain SGD.

  Args:
    momentum: the momentum factor, in [0, 1).

  Returns:
    A :class:`Feedback` whose state is ``(u, v)``, zeros at first.

  Examples:
    >>> import jax.numpy as jnp
    >>> from clipjax import compression
    >>> fb, c = compression.dgc_momentum(0.5), compression.top_k(0.25)
    >>> g = jnp.array([1.0, 0.5, -0.25, 2.0])
    >>> state = fb.init(g, False)
    >>> for _ in range(2):
    ...   v = fb.prepare(g, state)  # u = 0.5 u + g; v + u
    ...   v_hat, _, _ = c.roundtrip(v, (), None)
    ...   update, state, _ = fb.finish(g, state, v_hat, v_hat)
    ...   print(v, update)
    [ 1.    0.5  -0.25  2.  ] [0. 0. 0. 2.]
    [ 2.5    1.25  -0.625  2.   ] [2.5 0.  0.  0. ]
    >>> print(*state)  # u and v are zeroed where something was sent
    [ 0.     0.75  -0.375  2.   ] [ 0.     1.25  -0.625  2.   ]

  References:
    Lin et al., `Deep gradient compression <https://arxiv.org/abs/1712.01887>`_,
    2018.
  """

  def init(leaf, distributed):
    del distributed
    return (_zeros(leaf), _zeros(leaf))

  def step(g, state):
    u, v = state
    u = momentum * u + _wide(g)
    return u, v + u

  def prepare(g, state):
    return step(g, state)[1].astype(g.dtype)

  def finish(g, state, local_hat, mean_hat):
    u, v = step(g, state)
    wide_hat = _wide(local_hat)
    residual = v - wide_hat
    u = jnp.where(local_hat != 0, jnp.zeros_like(u), u)
    return mean_hat, (u, residual), residual

  return Feedback("dgc", init, prepare, finish)


FEEDBACKS: dict[str | None, Callable[[], Feedback]] = {
  "error_feedback": error_feedback,
  "ef21": ef21,
  None: no_feedback,
}
"""The feedbacks a transformation's ``feedback=`` names, by name."""


def resolve_feedback(call: str, feedback: Any) -> Feedback:
  """``feedback=`` as a :class:`Feedback`: one given, or one named in
  :data:`FEEDBACKS` (``"error_feedback"``, ``"ef21"``, ``None``).

  Raises ``TypeError`` for anything else that is not a string, ``ValueError``
  for a string that names no feedback; both name ``call`` and the value.
  """
  if isinstance(feedback, Feedback):
    return feedback
  names = tuple(FEEDBACKS)
  if feedback is not None and not isinstance(feedback, str):
    raise TypeError(
      f"{call}(feedback={feedback!r}) must be a Feedback (e.g."
      f" compression.error_feedback(decay=0.9)) or one of {names}."
    )
  if feedback not in FEEDBACKS:
    raise ValueError(
      f"{call}(feedback={feedback!r}) must be one of {names} or a Feedback."
    )
  return FEEDBACKS[feedback]()

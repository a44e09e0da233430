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

from clipjax.compression._base import compute_dtype


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
  """The update is the decoded estimate; nothing is kept."""

  def init(leaf, distributed):
    del leaf, distributed
    return ()

  def prepare(g, state):
    del state
    return g

  def finish(g, state, local_hat, mean_hat):
    return mean_hat, state, _wide(g) - _wide(local_hat)

  return Feedback("none", init, prepare, finish)


def error_feedback() -> Feedback:
  """Adds back what was not sent: compress ``a = g + e``, keep ``e = a - a_hat``.

  The residual is the rounded difference ``a - a_hat`` in the state's dtype, so
  ``a_hat + e == a`` holds bitwise whenever ``a_hat`` is 0 or within a factor 2
  of ``a`` elementwise (sparsifiers, casts, natural compression; Sterbenz's
  lemma), and to half an ulp of ``e`` otherwise.

  References:
    Seide et al., 1-bit stochastic gradient descent and its application to
    data-parallel distributed training of speech DNNs, 2014; Stich, Cordonnier
    and Jaggi, `Sparsified SGD with memory <https://arxiv.org/abs/1809.07599>`_,
    2018.
  """

  def init(leaf, distributed):
    del distributed
    return _zeros(leaf)

  def corrected(g, e):
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

"""Ghost norms: per-example gradient norms read off the jaxpr of a batched loss.

The loss is traced twice, at batch sizes ``B`` and ``B + 1``; a dimension that
differs between the two programs is a batch dimension. Each parameter leaf is
then followed through the program until it meets a batched value (a *contact*):

- ``dot_general(activation, W)`` (a dense layer, also with sequence inputs):
  the norm of each example's gradient ``a_b^T g_b`` comes from the layer's input
  ``a`` and its output gradient ``g`` (Li et al. 2022), through the Gram
  matrices ``(a_b a_b^T) * (g_b g_b^T)`` or the outer product ``a_b^T g_b``,
  whichever costs less;
- ``gather(E, indices)`` (an embedding lookup): the Gram form with the
  "same token" mask;
- ``conv_general_dilated(activation, K)`` (a convolution in any number of
  spatial dimensions, with any strides, dilations, padding, layout and
  feature groups): the layer's input sliced once per kernel window position
  (``T`` rows of ``C_in / G`` per group), then per group either the Gram
  form or the explicit per-example kernel gradient, whichever costs less
  (mixed ghost clipping, Bu et al. 2022);
- an elementwise op with a parameter broadcast over the batch (biases, the
  scale and offset of a layer norm): the per-example gradients are formed
  explicitly; they are no larger than the activations.

The output gradients ``g`` come from one backward pass with respect to zero
*probes* added at each contact; the weights are never differentiated there.
The clipped sum is then one more transposed product per contact, with ``g``'s
rows scaled by each example's clip factor (book-keeping, Bu et al. 2023).
Parameters are followed into ``scan`` bodies: a leaf stacked along the scan
(``xs``) gets its norms summed over the iterations, a dense or elementwise
leaf the body closes over is one layer seeing every iteration. Leaves whose
contact is anything else (a custom rule, a weight used twice, a parameter in
a scan's carry, a nested scan) are reported as fallbacks; the caller gets their
per-example gradients by ``jax.vmap``.
"""

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from clipjax import _norms

# Unary ops that only relabel, cast or broadcast a parameter; a chain of them
# from a leaf to a contact is differentiated through with ``jax.vjp``.
_CHAIN_PRIMS = frozenset(
  {
    "reshape",
    "convert_element_type",
    "transpose",
    "broadcast_in_dim",
    "squeeze",
    "expand_dims",
    "copy",
    "copy_p",
    "reduce_precision",
  }
)
# The subset that keeps every element once, so a norm taken after it is the norm
# of the leaf's gradient.
_NORM_KEEPING = _CHAIN_PRIMS - {"broadcast_in_dim"}
_ELEMENTWISE = frozenset(
  {
    "add",
    "sub",
    "mul",
    "div",
    "max",
    "min",
    "pow",
    "atan2",
    "rem",
    "select_n",
    "nextafter",
  }
)
_INLINE = frozenset(
  {"pjit", "jit", "closed_call", "core_call", "checkpoint", "remat", "remat2"}
)


@dataclasses.dataclass(frozen=True)
class ScanUse:
  """How a parameter used inside a ``scan`` body enters it.

  Attributes:
    at: the key of the ``scan`` equation.
    length: its number of iterations.
    stacked: the leaf enters as ``xs``, one slice per iteration (a layer
      stack, as ``nnx.scan`` over blocks); else the body closes over it (the
      same weight at every iteration).
    outer: for a stacked leaf, the chain from the leaf to the scan's operand
      (the tap's own chain then starts from the slice).
  """

  at: tuple[int, ...]
  length: int
  stacked: bool
  outer: tuple[Any, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Param:
  """A value computed from parameters only (no batch)."""

  leaves: frozenset[int]
  chain: tuple[Any, ...] | None  # unary eqns from one leaf; None if not a chain
  scan: ScanUse | None = None  # inside a scan body: how the leaf came in


@dataclasses.dataclass(frozen=True)
class _Batched:
  """A value that depends on the batch; ``axes`` are its batch dimensions."""

  axes: tuple[int, ...]


_CONST = None  # a value that depends on neither


@dataclasses.dataclass(frozen=True)
class Tap:
  """One contact of a parameter leaf with the batch, handled without vmap."""

  kind: str  # "dense", "embedding", "conv", "elementwise" or "broadcast"
  key: tuple[int, ...]  # eqn indices through inlined calls, then the operand
  leaf: int
  chain: tuple[Any, ...]
  eqn: Any
  batch_axis: int  # of the contact's output
  act_batch_axis: int  # of the activation (dense, conv) or the indices (embedding)
  scan: ScanUse | None = None  # the contact is in a scan body


@dataclasses.dataclass(frozen=True)
class Analysis:
  """What the jaxpr says about each parameter leaf."""

  taps: tuple[Tap, ...]
  fallback: dict[int, str]  # leaf -> why it needs vmap


def _batch_axes(v1: Any, v2: Any) -> tuple[int, ...]:
  s1, s2 = v1.aval.shape, v2.aval.shape
  if len(s1) != len(s2):
    return tuple(range(len(s1)))
  return tuple(i for i, (a, b) in enumerate(zip(s1, s2, strict=True)) if a != b)


class StructureError(ValueError):
  """The loss traces to different programs at two batch sizes."""


def _sub_jaxpr(eqn: Any) -> tuple[Any, Sequence[Any]]:
  inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  if isinstance(inner, jcore.ClosedJaxpr):
    return inner.jaxpr, inner.consts
  return inner, ()


def analyze(closed1: Any, closed2: Any, n_params: int) -> Analysis:
  """Finds the contacts of the first ``n_params`` inputs with the batch."""
  taps: list[Tap] = []
  fallback: dict[int, str] = {}

  def run(
    j1: Any, j2: Any, infos: list[Any], prefix: tuple[int, ...], in_scan: bool = False
  ) -> list[Any]:
    env: dict[Any, Any] = {}
    for v in j1.constvars:
      env[v] = _CONST
    for v, info in zip(j1.invars, infos, strict=True):
      env[v] = info
    if len(j1.eqns) != len(j2.eqns):
      raise StructureError("different number of operations")

    def read(v: Any) -> Any:
      return _CONST if isinstance(v, jcore.Literal) else env[v]

    for i, (e1, e2) in enumerate(zip(j1.eqns, j2.eqns, strict=True)):
      if e1.primitive is not e2.primitive:
        raise StructureError(f"{e1.primitive} against {e2.primitive}")
      ins = [read(v) for v in e1.invars]
      key = (*prefix, i)
      if e1.primitive.name in _INLINE and any(x is not _CONST for x in ins):
        sub1, _ = _sub_jaxpr(e1)
        sub2, _ = _sub_jaxpr(e2)
        outs = run(sub1, sub2, ins, key, in_scan)
        for v, info in zip(e1.outvars, outs, strict=True):
          env[v] = info
        continue
      if (
        e1.primitive.name == "scan"
        and not in_scan
        and e1.params["length"] == e2.params["length"]
        and any(isinstance(x, _Param) for x in ins)
      ):
        outs = _scan(e1, e2, ins, key)
        for v1, v2, info in zip(e1.outvars, e2.outvars, outs, strict=True):
          if isinstance(info, _Batched) or _batch_axes(v1, v2):
            env[v1] = _Batched(_batch_axes(v1, v2))
          elif isinstance(info, _Param):  # params only, out of the scan
            env[v1] = _Param(info.leaves, None)
          else:
            env[v1] = _CONST
        continue
      params = [x for x in ins if isinstance(x, _Param)]
      batched = any(isinstance(x, _Batched) for x in ins)
      if params and batched:
        _contact(e1, e2, ins, key)
      elif params and any(
        _batch_axes(*vs) for vs in zip(e1.outvars, e2.outvars, strict=True)
      ):
        _broadcast_contact(e1, e2, ins, key)
        batched = True
      for v1, v2 in zip(e1.outvars, e2.outvars, strict=True):
        if batched:
          env[v1] = _Batched(_batch_axes(v1, v2))
        elif params:
          env[v1] = _param_out(e1, ins, params)
        else:
          env[v1] = _Batched(_batch_axes(v1, v2)) if _batch_axes(v1, v2) else _CONST
    return [read(v) for v in j1.outvars]

  def _param_out(eqn: Any, ins: list[Any], params: list[_Param]) -> _Param:
    leaves = frozenset().union(*(p.leaves for p in params))
    p = params[0]
    if (
      len(ins) == 1
      and len(eqn.outvars) == 1
      and p.chain is not None
      and eqn.primitive.name in _CHAIN_PRIMS
    ):
      return _Param(leaves, (*p.chain, eqn), p.scan)
    return _Param(leaves, None)

  def _scan(e1: Any, e2: Any, ins: list[Any], key: tuple[int, ...]) -> list[Any]:
    """Follows parameters into a scan body; returns the infos of its outputs.

    A leaf passed as ``xs`` is used one slice per iteration, a leaf among the
    consts at every iteration; each contact in the body is a tap that
    applies at every iteration. A parameter in the carry gives up. The
    carry's infos are iterated to a fixed point, as a carry can become
    batched after the first iteration.
    """
    nc, ncar = e1.params["num_consts"], e1.params["num_carry"]
    length = int(e1.params["length"])
    b1, b2 = e1.params["jaxpr"].jaxpr, e2.params["jaxpr"].jaxpr
    infos: list[Any] = []
    for j, (x, v1, v2) in enumerate(zip(ins, b1.invars, b2.invars, strict=True)):
      if isinstance(x, _Param):
        if j < nc:
          infos.append(_Param(x.leaves, x.chain, ScanUse(key, length, False)))
        elif j >= nc + ncar and x.chain is not None and len(x.leaves) == 1:
          infos.append(_Param(x.leaves, (), ScanUse(key, length, True, x.chain)))
        else:
          where = "carried by `scan`" if j < nc + ncar else "used by `scan`"
          _give_up([x], where)
          infos.append(_Param(x.leaves, None))
      elif isinstance(x, _Batched) or _batch_axes(v1, v2):
        infos.append(_Batched(_batch_axes(v1, v2)))
      else:
        infos.append(_CONST)
    while True:
      n_taps, before = len(taps), dict(fallback)
      outs = run(b1, b2, infos, key, in_scan=True)
      changed = False
      for c in range(ncar):
        if isinstance(outs[c], _Batched) and not isinstance(infos[nc + c], _Batched):
          infos[nc + c] = _Batched(_batch_axes(b1.invars[nc + c], b2.invars[nc + c]))
          changed = True
      if not changed:
        break
      del taps[n_taps:]
      fallback.clear()
      fallback.update(before)
    for c in range(ncar):
      if isinstance(outs[c], _Param):
        _give_up([outs[c]], "carried by `scan`")
    return outs

  def _give_up(ins: list[Any], why: str) -> None:
    for x in ins:
      if isinstance(x, _Param):
        for leaf in x.leaves:
          fallback.setdefault(leaf, why)

  def _single_leaf(x: Any, keep_norm: bool) -> int | None:
    if not isinstance(x, _Param) or x.chain is None or len(x.leaves) != 1:
      return None
    chain = (*x.scan.outer, *x.chain) if x.scan is not None else x.chain
    if keep_norm and any(e.primitive.name not in _NORM_KEEPING for e in chain):
      return None
    return next(iter(x.leaves))

  def _stacked_or_outside(x: _Param) -> bool:
    """A contact whose every iteration's norms add up (or that is in no scan)."""
    return x.scan is None or x.scan.stacked

  def _one_axis(x: Any) -> int | None:
    if isinstance(x, _Batched) and len(x.axes) == 1:
      return x.axes[0]
    return None

  def _broadcast_contact(
    e1: Any, e2: Any, ins: list[Any], key: tuple[int, ...]
  ) -> None:
    """A parameter broadcast to the batch shape (a class token, say)."""
    axes = _batch_axes(e1.outvars[0], e2.outvars[0])
    leaf = _single_leaf(ins[0], keep_norm=False) if len(ins) == 1 else None
    if e1.primitive.name == "broadcast_in_dim" and len(axes) == 1 and leaf is not None:
      if ins[0].scan is not None:
        _give_up(ins, "broadcast over the batch inside `scan`")
        return
      taps.append(Tap("broadcast", (*key, 0), leaf, ins[0].chain, e1, axes[0], axes[0]))
    else:
      _give_up(ins, f"broadcast over the batch by `{e1.primitive.name}`")

  def _contact(e1: Any, e2: Any, ins: list[Any], key: tuple[int, ...]) -> None:
    name = e1.primitive.name
    out_axes = _batch_axes(e1.outvars[0], e2.outvars[0]) if e1.outvars else ()
    why = f"used by `{name}`"
    if any(isinstance(x, _Param) and x.scan and not x.scan.stacked for x in ins):
      why += " and closed over by `scan`"
    if len(e1.outvars) != 1 or len(out_axes) != 1:
      _give_up(ins, f"{why}, whose output is not batched along one axis")
      return
    (k,) = out_axes
    if name == "dot_general":
      (lc, rc), (lb, rb) = e1.params["dimension_numbers"]
      for p_idx in (0, 1):
        leaf = _single_leaf(ins[p_idx], keep_norm=True)
        a_axis = _one_axis(ins[1 - p_idx])
        contracted = (lc, rc)[1 - p_idx]
        if (
          leaf is not None
          and a_axis is not None
          and a_axis not in contracted
          and not lb
          and not rb
        ):
          chain = ins[p_idx].chain
          taps.append(
            Tap("dense", (*key, p_idx), leaf, chain, e1, k, a_axis, ins[p_idx].scan)
          )
          return
    if name == "conv_general_dilated":
      leaf = _single_leaf(ins[1], keep_norm=True)
      dn = e1.params["dimension_numbers"]
      if (
        leaf is not None
        and _one_axis(ins[0]) == dn.lhs_spec[0]
        and k == dn.out_spec[0]
        and e1.params["batch_group_count"] == 1
        and _stacked_or_outside(ins[1])
      ):
        taps.append(
          Tap("conv", (*key, 1), leaf, ins[1].chain, e1, k, dn.lhs_spec[0], ins[1].scan)
        )
        return
    if name == "gather":
      leaf = _single_leaf(ins[0], keep_norm=True)
      i_axis = _one_axis(ins[1])
      dn = e1.params["dimension_numbers"]
      out_rank = len(e1.outvars[0].aval.shape)
      idx_shape = e1.invars[1].aval.shape
      standard = (
        len(e1.invars[0].aval.shape) == 2
        and tuple(dn.offset_dims) == (out_rank - 1,)
        and tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and not tuple(dn.operand_batching_dims)
        and idx_shape
        and idx_shape[-1] == 1
        and i_axis is not None
        and i_axis == k
        and i_axis < len(idx_shape) - 1
      )
      if (
        leaf is not None
        and i_axis is not None
        and standard
        and _stacked_or_outside(ins[0])
      ):
        tap = Tap(
          "embedding", (*key, 0), leaf, ins[0].chain, e1, k, i_axis, ins[0].scan
        )
        taps.append(tap)
        return
    if name in _ELEMENTWISE:
      out_rank = len(e1.outvars[0].aval.shape)
      found = []
      for j, x in enumerate(ins):
        if not isinstance(x, _Param):
          continue
        shape = e1.invars[j].aval.shape
        leaf = _single_leaf(x, keep_norm=False)
        if leaf is None or not (
          shape == () or (len(shape) == out_rank and shape[k] == 1)
        ):
          break
        found.append(
          Tap("elementwise", (*key, j), leaf, x.chain or (), e1, k, k, x.scan)
        )
      else:
        taps.extend(found)
        return
    _give_up(ins, why)

  n_in = len(closed1.jaxpr.invars)
  infos: list[Any] = [_Param(frozenset({i}), ()) for i in range(n_params)]
  infos += [
    _Batched(_batch_axes(v1, v2))
    for v1, v2 in zip(
      closed1.jaxpr.invars[n_params:], closed2.jaxpr.invars[n_params:], strict=True
    )
  ]
  assert len(infos) == n_in
  run(closed1.jaxpr, closed2.jaxpr, infos, ())
  # A leaf with a dense or embedding contact must have no other contact; several
  # elementwise contacts add up.
  per_leaf: dict[int, list[Tap]] = {}
  for t in taps:
    per_leaf.setdefault(t.leaf, []).append(t)
  for leaf, ts in per_leaf.items():
    if len(ts) > 1 and any(t.kind in ("dense", "embedding", "conv") for t in ts):
      fallback.setdefault(leaf, f"used by {len(ts)} layers")
  kept = tuple(t for t in taps if t.leaf not in fallback)
  return Analysis(kept, fallback)


def evaluate(
  closed: Any,
  args: Sequence[Any],
  taps: dict[tuple[int, ...], Tap],
  probes: dict[tuple[int, ...], jax.Array],
  prefix: tuple[int, ...] = (),
) -> tuple[list[Any], dict[tuple[int, ...], jax.Array]]:
  """Runs ``closed`` on ``args`` with the (zero) probes added at the taps.

  Returns the outputs and, per dense, embedding or conv tap, the activation
  or the indices that met the parameter. A ``scan`` with taps in its body
  runs as a ``lax.scan`` of this same evaluation: its taps' probes (stacked
  over the iterations) come in as ``xs``, their records go out as ``ys``.
  ``prefix`` is the key of the equation whose body ``closed`` is.
  """
  records: dict[tuple[int, ...], jax.Array] = {}
  prefixes = {k[:n] for k in taps for n in range(1, len(k) - 1)}
  scans = {t.scan.at for t in taps.values() if t.scan is not None}

  def run(
    jaxpr: Any, consts: Sequence[Any], vals: Sequence[Any], prefix: tuple[int, ...]
  ):
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
      return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
      env[v] = x
    for v, x in zip(jaxpr.invars, vals, strict=True):
      env[v] = x
    for i, eqn in enumerate(jaxpr.eqns):
      key = (*prefix, i)
      ins = [read(v) for v in eqn.invars]
      if eqn.primitive.name in _INLINE and key in prefixes:
        sub, sub_consts = _sub_jaxpr(eqn)
        outs = run(sub, sub_consts, ins, key)
      elif eqn.primitive.name == "scan" and key in scans:
        outs = scan(eqn, ins, key)
      else:
        outs = bind(eqn, ins, key)
        if not eqn.primitive.multiple_results:
          outs = [outs]
      for v, x in zip(eqn.outvars, outs, strict=True):
        env[v] = x
    return [read(v) for v in jaxpr.outvars]

  def scan(eqn: Any, ins: list[Any], key: tuple[int, ...]) -> list[Any]:
    p = eqn.params
    nc, ncar = p["num_consts"], p["num_carry"]
    consts, init, xs = ins[:nc], ins[nc : nc + ncar], ins[nc + ncar :]
    inner = {k: t for k, t in taps.items() if t.scan is not None and t.scan.at == key}

    def step(carry, x):
      xs_l, probes_l = x
      outs, recs = evaluate(p["jaxpr"], [*consts, *carry, *xs_l], inner, probes_l, key)
      return outs[:ncar], (outs[ncar:], recs)

    carry, (ys, recs) = jax.lax.scan(
      step,
      list(init),
      (list(xs), {k: probes[k] for k in inner}),
      length=p["length"],
      reverse=p["reverse"],
      unroll=p["unroll"],
    )
    records.update(recs)
    return [*carry, *ys]

  def bind(eqn: Any, ins: list[Any], key: tuple[int, ...]) -> Any:
    params = eqn.primitive.get_bind_params(eqn.params)
    here = [t for j in range(len(ins)) if (t := taps.get((*key, j))) is not None]
    if not here:
      return eqn.primitive.bind(*ins, **params)
    if here[0].kind == "elementwise":
      ins = list(ins)
      for t in here:
        j = t.key[-1]
        ins[j] = jnp.reshape(ins[j], probe_shape(t, 1)) + probes[t.key]
      return eqn.primitive.bind(*ins, **params)
    (tap,) = here
    if tap.kind != "broadcast":
      records[tap.key] = ins[1 - tap.key[-1]]
    return eqn.primitive.bind(*ins, **params) + probes[tap.key]

  outs = run(closed.jaxpr, closed.consts, args, prefix)
  return outs, records


def probe_shape(tap: Tap, batch_size: int, stacked: bool = False) -> tuple[int, ...]:
  """The shape of the zero probe added at a tap (per iteration of a scan, or
  with ``stacked``, stacked over its iterations as the scan takes it)."""
  out = tap.eqn.outvars[0].aval.shape
  lead = (tap.scan.length,) if stacked and tap.scan is not None else ()
  if tap.kind != "elementwise":
    return (*lead, *out)
  operand = tap.eqn.invars[tap.key[-1]].aval.shape
  shape = list(operand) if operand else [1] * len(out)
  shape[tap.batch_axis] = batch_size
  return (*lead, *shape)


def probe_dtype(tap: Tap) -> Any:
  """The dtype of the zero probe added at a tap."""
  if tap.kind == "elementwise":
    return tap.eqn.invars[tap.key[-1]].aval.dtype
  return tap.eqn.outvars[0].aval.dtype


def _apply_chain(chain: tuple[Any, ...], x: jax.Array) -> jax.Array:
  for eqn in chain:
    x = eqn.primitive.bind(x, **eqn.primitive.get_bind_params(eqn.params))
  return x


def chain_transpose(
  chain: tuple[Any, ...], leaf: Any
) -> Callable[[jax.Array], jax.Array]:
  """The transpose of the (linear) chain from a leaf to its use."""
  zero = jnp.zeros(leaf.shape, leaf.dtype)
  _, vjp = jax.vjp(lambda x: _apply_chain(chain, x), zero)
  return lambda ct: vjp(ct)[0]


def _dense_layout(
  tap: Tap, act: jax.Array, g: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The activation as ``(B, T, D_in)`` and the output gradient as ``(B, T, D_out)``."""
  (lc, rc), _ = tap.eqn.params["dimension_numbers"]
  p_idx = tap.key[-1]
  p_contract = (lc, rc)[p_idx]
  a_contract = (lc, rc)[1 - p_idx]
  p_rank = len(tap.eqn.invars[p_idx].aval.shape)
  a_free = [d for d in range(act.ndim) if d not in a_contract]
  p_free = [d for d in range(p_rank) if d not in p_contract]
  ia = a_free.index(tap.act_batch_axis)
  a_pos = list(range(len(a_free)))
  if p_idx == 0:  # the parameter is the left operand: its free dims come first
    a_pos = [len(p_free) + d for d in a_pos]
    p_pos = list(range(len(p_free)))
  else:
    p_pos = list(range(len(a_free), len(a_free) + len(p_free)))
  b = act.shape[tap.act_batch_axis]
  a_perm = [
    tap.act_batch_axis,
    *(d for d in a_free if d != tap.act_batch_axis),
    *a_contract,
  ]
  a_r = jnp.transpose(act, a_perm).reshape(
    b, -1, math.prod(act.shape[d] for d in a_contract)
  )
  g_perm = [a_pos[ia], *(a_pos[j] for j in range(len(a_free)) if j != ia), *p_pos]
  d_out = math.prod(g.shape[d] for d in p_pos)
  g_r = jnp.transpose(g, g_perm).reshape(b, -1, d_out)
  return a_r, g_r


def dense_method(t: int, d_in: int, d_out: int) -> str:
  """``"gram"`` or ``"outer"``: whichever costs fewer multiply-adds per example."""
  return "gram" if t * (d_in + d_out) <= d_in * d_out else "outer"


# The per-example norms decide each example's clip factor (its privacy bound),
# so their products run at full float32 precision also where the default
# matmul precision is lower (TF32 on NVIDIA GPUs; a no-op on CPUs).
_HIGHEST = jax.lax.Precision.HIGHEST


def _f32(x: jax.Array) -> jax.Array:
  return x.astype(_norms.accumulation_dtype(x.dtype))


def dense_sq_norms(tap: Tap, act: jax.Array, g: jax.Array) -> jax.Array:
  """``||a_b^T g_b||^2`` per example, without forming ``a_b^T g_b`` if cheaper."""
  a_r, g_r = _dense_layout(tap, act, g)
  return _dense_sq(a_r, g_r)


def _dense_sq(a_r: jax.Array, g_r: jax.Array) -> jax.Array:
  """``||a_b^T g_b||^2`` of inputs ``(B, T, D_in)``, gradients ``(B, T, D_out)``."""
  a_r, g_r = _f32(a_r), _f32(g_r)
  _, t, d_in = a_r.shape
  d_out = g_r.shape[-1]
  if t == 1:
    return jnp.sum(a_r[:, 0] ** 2, axis=-1) * jnp.sum(g_r[:, 0] ** 2, axis=-1)
  if dense_method(t, d_in, d_out) == "gram":
    ga = jnp.einsum("btd,bsd->bts", a_r, a_r, precision=_HIGHEST)
    gg = jnp.einsum("btd,bsd->bts", g_r, g_r, precision=_HIGHEST)
    return jnp.sum(ga * gg, axis=(1, 2))
  outer = jnp.einsum("bti,btj->bij", a_r, g_r, precision=_HIGHEST)
  return jnp.sum(outer**2, axis=(1, 2))


def conv_sizes(tap: Tap) -> tuple[int, int, int, int]:
  """``(T, G, D, P)`` of a convolution tap, per example.

  ``T`` output positions, ``G`` feature groups, ``D = C_in / G * prod(kernel
  window)`` inputs and ``P = C_out / G`` outputs of each group's kernel.
  """
  dn = tap.eqn.params["dimension_numbers"]
  out = tap.eqn.outvars[0].aval.shape
  rhs = tap.eqn.invars[1].aval.shape
  groups = int(tap.eqn.params["feature_group_count"])
  t = math.prod(out[d] for d in dn.out_spec[2:])
  d = rhs[dn.rhs_spec[1]] * math.prod(rhs[d] for d in dn.rhs_spec[2:])
  return t, groups, d, rhs[dn.rhs_spec[0]] // groups


def conv_method(tap: Tap) -> str:
  """``"gram"`` or ``"explicit"``, by :func:`dense_method` on each group's sizes."""
  t, _, d, p = conv_sizes(tap)
  return "explicit" if dense_method(t, d, p) == "outer" else "gram"


def conv_slices(tap: Tap, act: jax.Array) -> list[jax.Array]:
  """The layer's input seen by each window position, as ``(B, T, G, C_in / G)``.

  For window position ``k``, the input elements that meet kernel entry ``k``
  at each of the ``T`` output positions: one strided slice of the padded
  (and, for ``lhs_dilation``, interior-padded) input, in the layout
  ``(batch, *spatial, channels)`` (a no-op for Flax's NHWC). The window
  positions come in C order. The patches are never stacked: the products
  that use them are summed over the window instead, faster on XLA:CPU than
  stacked patches or ``lax.conv_general_dilated_patches`` (a grouped
  convolution) across the layer shapes of a CNN.
  """
  params = tap.eqn.params
  dn = params["dimension_numbers"]
  t, groups, _, _ = conv_sizes(tap)
  rhs = tap.eqn.invars[1].aval.shape
  window = [rhs[i] for i in dn.rhs_spec[2:]]
  out = [tap.eqn.outvars[0].aval.shape[i] for i in dn.out_spec[2:]]
  x = jnp.transpose(act, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))
  b, c = x.shape[0], x.shape[-1]
  config = [(0, 0, 0)]
  for (lo, hi), dil in zip(params["padding"], params["lhs_dilation"], strict=True):
    config.append((lo, hi, dil - 1))
  x = jax.lax.pad(x, jnp.zeros((), x.dtype), [*config, (0, 0, 0)])
  strides, rhs_dil = params["window_strides"], params["rhs_dilation"]
  slices = []
  for offset in itertools.product(*(range(k) for k in window)):
    start = [o * r for o, r in zip(offset, rhs_dil, strict=True)]
    limit = [a + (n - 1) * st + 1 for a, n, st in zip(start, out, strides, strict=True)]
    piece = jax.lax.slice(x, [0, *start, 0], [b, *limit, c], [1, *strides, 1])
    slices.append(piece.reshape(b, t, groups, c // groups))
  return slices


def _conv_out_grad(tap: Tap, g: jax.Array) -> jax.Array:
  """A convolution's output gradient as ``(B, T, G, C_out / G)``, in float32."""
  dn = tap.eqn.params["dimension_numbers"]
  t, groups, _, p = conv_sizes(tap)
  g = jnp.transpose(g, (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1]))
  return _f32(g.reshape(g.shape[0], t, groups, p))


def conv_sq_norms(tap: Tap, act: jax.Array, g: jax.Array) -> jax.Array:
  """Per-example squared norm of a convolution kernel's gradient, by the Gram form.

  Example ``b``'s kernel gradient at window position ``k`` is, per group,
  ``A_bk^T G_b``: the ``(T, C_in / G)`` input slice that meets it
  (:func:`conv_slices`) against the ``(T, C_out / G)`` output gradient. Its
  squared norm, summed over the window and the groups, is read off the Gram
  matrices ``(sum_k A_bk A_bk^T) * (G_b G_b^T)``. Where forming the products
  costs fewer multiply-adds (:func:`conv_method`), they are formed instead,
  by :func:`conv_per_example`, and kept for the clipped sum.
  """
  g_r = _conv_out_grad(tap, g)
  ga = sum(
    jnp.einsum("btgc,bsgc->bgts", _f32(a), _f32(a), precision=_HIGHEST)
    for a in conv_slices(tap, act)
  )
  gg = jnp.einsum("btgp,bsgp->bgts", g_r, g_r, precision=_HIGHEST)
  return jnp.sum(ga * gg, axis=(1, 2, 3))


def conv_per_example(tap: Tap, act: jax.Array, g: jax.Array) -> jax.Array:
  """Per-example kernel gradients ``(B, *kernel)`` in the kernel's layout.

  The explicit method: per window position ``k`` and group, ``A_bk^T G_b``
  (:func:`conv_sq_norms` names them), formed and kept, so that the clipped
  sum is a contraction of these with the clip factors, a fraction of a
  second kernel-gradient convolution (the book-keeping pass); a
  convolution's kernel is small beside its activations.
  """
  dn = tap.eqn.params["dimension_numbers"]
  _, groups, _, p = conv_sizes(tap)
  rhs = tap.eqn.invars[1].aval.shape
  window = [rhs[i] for i in dn.rhs_spec[2:]]
  g_r = _conv_out_grad(tap, g)
  per_window = [
    jnp.einsum("btgc,btgp->bcgp", _f32(a), g_r, precision=_HIGHEST)
    for a in conv_slices(tap, act)
  ]
  b, c = per_window[0].shape[:2]
  kernel = jnp.stack(per_window, axis=1).reshape(b, *window, c, groups * p)
  # Axes (batch, *spatial, in, out), to the kernel's own layout.
  order = (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0])
  kernel = jnp.transpose(kernel, (0, *(1 + i for i in np.argsort(order))))
  # In the kernel operand's dtype, as its chain back to the leaf expects.
  return kernel.astype(tap.eqn.invars[1].aval.dtype)


def embedding_sq_norms(tap: Tap, idx: jax.Array, g: jax.Array) -> jax.Array:
  """Per-example squared norm of an embedding table's gradient."""
  b = idx.shape[tap.act_batch_axis]
  ids = jnp.moveaxis(idx[..., 0], tap.act_batch_axis, 0).reshape(b, -1)
  rows = _f32(jnp.moveaxis(g, tap.batch_axis, 0)).reshape(b, ids.shape[1], -1)
  vocab = tap.eqn.invars[0].aval.shape[0]
  mode = str(tap.eqn.params.get("mode", ""))
  if "CLIP" in mode:
    ids = jnp.clip(ids, 0, vocab - 1)
  else:  # out-of-range lookups read the fill value and get no gradient
    valid = (ids >= 0) & (ids < vocab)
    rows = jnp.where(valid[..., None], rows, jnp.zeros((), rows.dtype))
  if ids.shape[1] == 1:
    return jnp.sum(rows[:, 0] ** 2, axis=-1)
  same = ids[:, :, None] == ids[:, None, :]
  gram = jnp.einsum("btd,bsd->bts", rows, rows, precision=_HIGHEST)
  return jnp.sum(jnp.where(same, gram, jnp.zeros((), gram.dtype)), axis=(1, 2))


def tap_sq_norms(tap: Tap, rec: jax.Array, g: jax.Array) -> jax.Array:
  """Per-example squared norms of a dense, embedding or conv tap's leaf.

  In a scan body, ``rec`` and ``g`` are stacked over the iterations: a
  stacked leaf's norms add up over them (each iteration's gradient is its
  own slice); a closed-over dense weight's gradient is the sum over the
  iterations, whose norm is that of one dense layer seeing every iteration's
  positions (the Gram form then includes the cross-iteration terms).
  """
  rule = {
    "dense": dense_sq_norms,
    "embedding": embedding_sq_norms,
    "conv": conv_sq_norms,
  }
  fn = rule[tap.kind]
  if tap.scan is None:
    return fn(tap, rec, g)
  if tap.scan.stacked:
    return jnp.sum(jax.vmap(lambda r, d: fn(tap, r, d))(rec, g), axis=0)
  a_r, g_r = jax.vmap(lambda r, d: _dense_layout(tap, r, d))(rec, g)
  merge = lambda x: jnp.swapaxes(x, 0, 1).reshape(x.shape[1], -1, x.shape[-1])
  return _dense_sq(merge(a_r), merge(g_r))


def tap_rows(tap: Tap, axis: int) -> int:
  """``axis`` of a tap's per-iteration value, in its value as evaluated."""
  return axis + (tap.scan is not None)


def _slice_aval(tap: Tap, leaf: Any) -> Any:
  """The aval a stacked leaf has in one iteration (after its outer chain)."""
  assert tap.scan is not None
  full = tap.scan.outer[-1].outvars[0].aval if tap.scan.outer else leaf
  return jax.ShapeDtypeStruct(tuple(full.shape[1:]), full.dtype)


def to_leaf(tap: Tap, leaf: Any, gv: jax.Array) -> jax.Array:
  """The leaf's gradient from its contact operand's (stacked over a scan)."""
  if tap.scan is None:
    return chain_transpose(tap.chain, leaf)(gv)
  if not tap.scan.stacked:
    return chain_transpose(tap.chain, leaf)(jnp.sum(gv, axis=0))
  per_slice = jax.vmap(chain_transpose(tap.chain, _slice_aval(tap, leaf)))(gv)
  return chain_transpose(tap.scan.outer, leaf)(per_slice)


def to_leaf_per_example(tap: Tap, leaf: Any, pe: jax.Array) -> jax.Array:
  """Per-example leaf gradients ``(B, *leaf)`` from the operand's (after a scan's
  iteration axis, for a tap in a scan body)."""
  if tap.scan is None:
    return jax.vmap(chain_transpose(tap.chain, leaf))(pe)
  if not tap.scan.stacked:
    return jax.vmap(chain_transpose(tap.chain, leaf))(jnp.sum(pe, axis=0))
  inner = jax.vmap(jax.vmap(chain_transpose(tap.chain, _slice_aval(tap, leaf))))
  stacked = jnp.swapaxes(inner(pe), 0, 1)
  return jax.vmap(chain_transpose(tap.scan.outer, leaf))(stacked)


def weighted_transpose(
  tap: Tap, recorded: jax.Array, g_weighted: jax.Array, v_aval: Any
) -> jax.Array:
  """The contact's transpose with respect to the parameter, for a given cotangent.

  Every contact is linear in its parameter operand, so this is the gradient of
  ``<g_weighted, contact(v)>``: with ``g``'s rows scaled by each example's clip
  factor, the clipped sum of the per-example gradients.
  """
  p_idx = tap.key[-1]
  params = tap.eqn.primitive.get_bind_params(tap.eqn.params)

  def contact(v):
    ins = [recorded, v] if p_idx == 1 else [v, recorded]
    return tap.eqn.primitive.bind(*ins, **params)

  _, vjp = jax.vjp(contact, jnp.zeros(v_aval.shape, v_aval.dtype))
  return vjp(g_weighted.astype(tap.eqn.outvars[0].aval.dtype))[0]


def expand_rows(mask: jax.Array, x: jax.Array, axis: int) -> jax.Array:
  """``mask`` (shape ``(B,)``) broadcast against ``x`` along ``axis``."""
  shape = [1] * x.ndim
  shape[axis] = mask.shape[0]
  return jnp.reshape(mask, shape)


def elementwise_per_example(tap: Tap, pg: jax.Array) -> jax.Array:
  """Per-example gradients of the operand, ``(B, *operand_shape)``, from its probe's.

  The operand has size 1 on the batch axis (or is a scalar), so moving the
  probe's batch axis to the front leaves one operand-shaped gradient per example.
  """
  operand = tap.eqn.invars[tap.key[-1]].aval.shape
  return jnp.moveaxis(pg, tap.batch_axis, 0).reshape(pg.shape[tap.batch_axis], *operand)


def broadcast_per_example(tap: Tap, pg: jax.Array) -> jax.Array:
  """Per-example gradients of a parameter broadcast over the batch.

  Example ``b``'s gradient is the transpose of the same broadcast with the
  batch dimension of size 1, applied to row ``b`` of the output gradient.
  """
  k = tap.batch_axis
  aval = tap.eqn.invars[0].aval
  shape = list(tap.eqn.outvars[0].aval.shape)
  shape[k] = 1
  dims = tap.eqn.params["broadcast_dimensions"]
  _, vjp = jax.vjp(
    lambda v: jax.lax.broadcast_in_dim(v, tuple(shape), dims),
    jnp.zeros(aval.shape, aval.dtype),
  )
  return jax.vmap(lambda row: vjp(jnp.expand_dims(row, k))[0], in_axes=k)(pg)


def leaf_names(tree: Any) -> list[str]:
  """``jax.tree_util.keystr`` of every leaf, for reports."""
  paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [jax.tree_util.keystr(p) for p, _ in paths]


def describe(analysis: Analysis, names: Sequence[str]) -> dict[str, str]:
  """One line per leaf: how its per-example norms are computed."""
  lines = {}
  for tap in analysis.taps:
    if tap.kind == "dense":
      a_aval = tap.eqn.invars[1 - tap.key[-1]].aval
      p_aval = tap.eqn.invars[tap.key[-1]].aval
      (lc, rc), _ = tap.eqn.params["dimension_numbers"]
      contract = (lc, rc)[1 - tap.key[-1]]
      d_in = math.prod(a_aval.shape[d] for d in contract)
      t = math.prod(
        s
        for d, s in enumerate(a_aval.shape)
        if d not in contract and d != tap.act_batch_axis
      )
      if tap.scan is not None and not tap.scan.stacked:
        t *= tap.scan.length  # one layer seeing every iteration's positions
      d_out = math.prod(p_aval.shape) // max(d_in, 1)
      how = "T=1" if t == 1 else dense_method(t, d_in, d_out)
      line = f"ghost: dense ({how})"
    elif tap.kind == "conv":
      line = f"ghost: conv ({conv_method(tap)})"
    elif tap.kind == "embedding":
      line = "ghost: embedding"
    elif tap.kind == "broadcast":
      line = "ghost: broadcast over the batch (per-example, small)"
    else:
      line = "ghost: elementwise (per-example, small)"
    if tap.scan is not None:
      how = "stacked" if tap.scan.stacked else "closed over"
      line += f" in scan (L={tap.scan.length}, {how})"
    lines[tap.leaf] = line
  for leaf, why in analysis.fallback.items():
    lines[leaf] = f"vmap ({why})"
  return {names[i]: lines.get(i, "unused (zero gradient)") for i in range(len(names))}

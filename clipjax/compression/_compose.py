"""``compose``: the values a compressor sends, compressed by another."""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from clipjax.compression._base import Compressor, Shape

# The outer compressor draws from the key itself (random-k regenerates its
# indices from it), the inner one from the key's words xor this constant: an
# unrelated stream for the counter hash, and no threefry per leaf.
_INNER_SALT = 0x632BE5AB
_PROBE_KEY = jax.ShapeDtypeStruct((2,), jnp.uint32)


def _inner_key(key: Any) -> Any:
  if key is None:
    return None
  if jax.dtypes.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return jnp.asarray(key).astype(jnp.uint32) ^ jnp.uint32(_INNER_SALT)


def _empty(state: Any) -> bool:
  return isinstance(state, tuple) and not state


def compose(outer: Compressor, *, values: Compressor) -> Compressor:
  """``outer``'s payload with its ``values`` array compressed by ``values``.

  For sparsifiers, whose payload is the kept ``values`` and where they go
  (:func:`top_k`, :func:`chunked_top_k`, :func:`random_k`): the values are
  encoded again by a quantizer or a cast, as SparseLoCo sends its chunked
  top-k in 2 bits. ``outer`` encodes the leaf, ``values`` encodes the 1-D
  array of its values, and the payload is ``outer``'s with ``"values"``
  replaced by ``values``'s payload of it (a nested dict). Decoding inverts
  both: ``values`` decodes the values, ``outer`` puts them back. The bytes are
  exact: ``outer``'s, less its values array's, plus ``values``'s payload of
  that array (``values.payload_bytes`` of its shape and dtype).

  The values are laid out as ``outer`` sends them: :func:`chunked_top_k`
  sends ``k`` per chunk, chunk after chunk, so a quantizer whose chunk is a
  multiple of ``k`` gives each scale the values of whole top-k chunks.
  ``outer`` draws from the key it is given, ``values`` from a key derived
  from it. The state is ``(outer's, values')``, or ``()`` when both are
  stateless.

  The composition is summable when both are (random-k's shared indices with
  values cast to bfloat16), stochastic when either is, and unbiased when both
  are (``outer``'s decoding being linear in its values, as a sparsifier's
  is).

  Args:
    outer: a :class:`Compressor` whose payload holds a ``"values"`` array.
    values: the :class:`Compressor` of that array, e.g. ``quantize(2)``.

  Returns:
    A :class:`Compressor` named ``"<outer>+<values>"``.

  Raises:
    TypeError: an argument is not a :class:`Compressor`.
    ValueError: ``outer``'s payload has no ``"values"`` array, or either runs
      its own rounds of averaging (PowerSGD's ``reduce``).

  Examples:
    SparseLoCo's payload: the 2 largest of every 64 entries, their values in
    2 bits with a scale per 64 of them, their positions in 6 bits:

    >>> import jax, jax.numpy as jnp
    >>> from clipjax import compression
    >>> c = compression.compose(
    ...   compression.chunked_top_k(2, chunk_size=64),
    ...   values=compression.quantize(2, chunk_size=64),
    ... )
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (1024,))
    >>> x_hat, payload, _ = c.roundtrip(x, (), None)
    >>> print(c.name, {k: v.shape for k, v in payload["values"].items()})
    chunked_top_k+int2 {'codes': (1, 8), 'scales': (1,)}
    >>> c.payload_bytes(x.shape, x.dtype)  # 8 + 4 bytes of values, 24 of indices
    36
    >>> print(int((x_hat != 0).sum()) <= 32, float(jnp.abs(x_hat).max()) > 0)
    True True

  References:
    Sarfi et al., `Communication efficient LLM pre-training with SparseLoCo
    <https://arxiv.org/abs/2508.15706>`_, 2025.
  """
  call = "compose"
  for arg, c in (("outer", outer), ("values", values)):
    if not isinstance(c, Compressor):
      raise TypeError(f"{call}({arg}={c!r}) must be a Compressor.")
    if c.reduce is not None:
      raise ValueError(
        f"{call}({arg}={c.name!r}) runs its own rounds of averaging (reduce);"
        " only single-round compressors compose."
      )

  @functools.cache
  def values_spec(shape: Shape, dtype: Any) -> jax.ShapeDtypeStruct:
    """The shape and dtype of ``outer``'s values for a leaf of ``shape``."""
    state = outer.init(shape, dtype)
    payload = jax.eval_shape(
      lambda x, key: outer.encode(x, state, key)[0],
      jax.ShapeDtypeStruct(shape, dtype),
      _PROBE_KEY,
    )
    got = payload.get("values") if isinstance(payload, dict) else None
    if not isinstance(got, jax.ShapeDtypeStruct):
      held = sorted(payload) if isinstance(payload, dict) else payload
      raise ValueError(
        f"{call}(outer={outer.name!r}): its payload (for shape {shape}) has no"
        f" 'values' array to compress; it holds {held}."
      )
    return got

  def spec(shape: Shape, dtype: Any) -> jax.ShapeDtypeStruct:
    return values_spec(tuple(shape), jnp.dtype(dtype))

  spec((256,), jnp.float32)  # fail at construction, not at the first step

  def join(outer_state: Any, values_state: Any) -> Any:
    if _empty(outer_state) and _empty(values_state):
      return ()
    return outer_state, values_state

  def split(state: Any) -> tuple[Any, Any]:
    return ((), ()) if _empty(state) else state

  def init(shape, dtype):
    v = spec(shape, dtype)
    return join(outer.init(shape, dtype), values.init(v.shape, v.dtype))

  def encode(x, state, key):
    outer_state, values_state = split(state)
    payload, outer_state = outer.encode(x, outer_state, key)
    inner, values_state = values.encode(
      payload["values"], values_state, _inner_key(key)
    )
    return {**payload, "values": inner}, join(outer_state, values_state)

  def decode(payload, shape, dtype, state, key):
    outer_state, values_state = split(state)
    v = spec(shape, dtype)
    v_hat = values.decode(
      payload["values"], v.shape, v.dtype, values_state, _inner_key(key)
    )
    return outer.decode({**payload, "values": v_hat}, shape, dtype, outer_state, key)

  def payload_bytes(shape, dtype):
    v = spec(shape, dtype)
    own = outer.payload_bytes(shape, dtype) - v.size * jnp.dtype(v.dtype).itemsize
    return own + values.payload_bytes(v.shape, v.dtype)

  return Compressor(
    name=f"{outer.name}+{values.name}",
    init=init,
    encode=encode,
    decode=decode,
    payload_bytes=payload_bytes,
    summable=outer.summable and values.summable,
    stochastic=outer.stochastic or values.stochastic,
    unbiased=outer.unbiased and values.unbiased,
  )

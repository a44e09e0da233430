"""Gradient compression: compressor + feedback + transport.

A **compressor** (:class:`Compressor`) is a frozen bundle of pure functions
over one array; it never sees a pytree and never talks to other devices:

- ``init(shape, dtype) -> state``: per-leaf state (PowerSGD's ``Q``; ``()``
  otherwise), deterministic so that all workers start equal;
- ``encode(x, state, key) -> (payload, state)``: ``payload`` is a dict of
  static-shape arrays, exactly what travels (values, int32 indices, sign bits
  packed 8 per byte, ternary codes 4 per byte, int8 levels or packed 4-bit
  and 2-bit codes with a float32 scale per chunk, float8 values with a
  power-of-two exponent byte per chunk, in-chunk positions (or, for DeMo's
  :func:`dct_top_k`, the frequencies of a chunk's cosine transform) in the
  fewest bits that hold them, low-rank factors); :func:`compose` nests a second
  compressor's payload of the values under ``"values"``;
- ``decode(payload, shape, dtype, state, key) -> x_hat``;
- ``payload_bytes(shape, dtype) -> int``: exact and static, the sum of
  ``size * itemsize`` over the payload's arrays;
- ``summable``: payloads of workers encoded with the same key and state may be
  summed before decoding (casts, shared-seed random-k, PowerSGD's factors);
  otherwise gather them and decode each (top-k, quantizers);
- ``stochastic`` / ``unbiased``: whether ``encode`` draws from the key, and
  whether ``E[x_hat] = x``;
- ``reduce(x, state, key, mean_fn) -> (mean_hat, local_hat, state)``: only for
  multi-round methods (PowerSGD), which average intermediate results between
  rounds. ``mean_fn`` is the identity on one process and
  ``lambda t: jax.lax.pmean(t, axis_name)`` inside ``shard_map``;
  ``local_hat`` is this worker's own decoded contribution, which error
  feedback subtracts.

A **feedback** (:class:`Feedback`) is per-leaf state beside the compressor,
checkpointed with the optimizer: ``prepare(g, state)`` gives the array to
compress, ``finish(g, state, local_hat, mean_hat)`` the update and the new
state. Error feedback, EF21 and DGC's momentum correction are feedbacks;
error feedback with a decay (``error_feedback(decay=beta)``) is DeMo's
momentum. :func:`compress` and ``compressed_mean`` take one by name
(``feedback="ef21"``) or as a :class:`Feedback`.

The **transport** on one process is :func:`compress`: encode then decode, so
the update is exactly what the wire carries, with the bytes counted in a
:class:`CompressionStats`. Across devices, the same compressor and feedback
run inside ``shard_map``, one device's pass being::

    x = feedback.prepare(g, fstate)
    if compressor.reduce is not None:                 # PowerSGD
      mean_hat, local_hat, cstate = compressor.reduce(x, cstate, key, pmean)
    else:
      payload, cstate = compressor.encode(x, cstate, key)
      local_hat = compressor.decode(payload, shape, dtype, cstate, key)
      if compressor.summable:                         # psum, then decode once
        mean_hat = compressor.decode(pmean(payload), shape, dtype, cstate, key)
      else:                                           # all_gather, decode each
        mean_hat = mean(decode(p) for p in all_gather(payload))
    update, fstate, _ = feedback.finish(g, fstate, local_hat, mean_hat)

Random-k needs the same key on every worker; quantizers may be given
per-worker keys. Stochastic rounding, random-k's indices, sampled top-k's
sample and PowerSGD's fresh start draw from a counter-based hash keyed by the
JAX key's data (``jax.random``'s threefry costs about fifty memory passes per
element on CPU, and a large share of the compiled program). The quantizers
decode with exact arithmetic (bit operations, selects, products that fit
float32), so every device decodes bit-identical values whatever XLA fuses.
Compressors assume a leaf of at least one element (the transform passes empty
leaves through) and int32 indexing (fewer than ``2**31`` elements).

Examples:
  >>> import jax, jax.numpy as jnp, optax
  >>> from clipjax import compression
  >>> tx = optax.chain(compression.compress(compression.sign()), optax.sgd(0.1))
  >>> params = {"w": jnp.zeros((256,))}
  >>> state = tx.init(params)
  >>> g = {"w": jnp.linspace(-1.0, 1.0, 256)}
  >>> u, state = jax.jit(tx.update)(g, state)
  >>> print(compression.compression_stats(state)["sign/ratio"])
  28.444445

References:
  Xu et al., `GRACE: a compressed communication framework for distributed
  machine learning <https://ieeexplore.ieee.org/document/9546506>`_, 2021.
"""

from clipjax.compression._base import Compressor as Compressor
from clipjax.compression._compose import compose as compose
from clipjax.compression._compressors import cast as cast
from clipjax.compression._compressors import chunked_top_k as chunked_top_k
from clipjax.compression._compressors import natural as natural
from clipjax.compression._compressors import qsgd as qsgd
from clipjax.compression._compressors import quantize as quantize
from clipjax.compression._compressors import random_k as random_k
from clipjax.compression._compressors import sign as sign
from clipjax.compression._compressors import terngrad as terngrad
from clipjax.compression._compressors import top_k as top_k
from clipjax.compression._dct import dct_top_k as dct_top_k
from clipjax.compression._dgc import dgc as dgc
from clipjax.compression._feedback import Feedback as Feedback
from clipjax.compression._feedback import dgc_momentum as dgc_momentum
from clipjax.compression._feedback import ef21 as ef21
from clipjax.compression._feedback import error_feedback as error_feedback
from clipjax.compression._feedback import no_feedback as no_feedback
from clipjax.compression._powersgd import powersgd as powersgd
from clipjax.compression._transform import CompressionStats as CompressionStats
from clipjax.compression._transform import CompressState as CompressState
from clipjax.compression._transform import compress as compress
from clipjax.compression._transform import compression_stats as compression_stats

__all__ = (
  "CompressState",
  "CompressionStats",
  "Compressor",
  "Feedback",
  "cast",
  "chunked_top_k",
  "compose",
  "compress",
  "compression_stats",
  "dct_top_k",
  "dgc",
  "dgc_momentum",
  "ef21",
  "error_feedback",
  "natural",
  "no_feedback",
  "powersgd",
  "qsgd",
  "quantize",
  "random_k",
  "sign",
  "terngrad",
  "top_k",
)

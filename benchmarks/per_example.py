"""Per-example clipped gradients (DP-SGD's core step) against a plain gradient step.

For each model, every method computes the sum over the batch of per-example
gradients, each clipped to L2 norm 1.0, from the same parameters and batches:

  jax plain          ``jax.jit(jax.grad(mean loss))``: no clipping, the JAX baseline
  clipjax ghost      ``clipjax.per_example_clipped_grad(..., method="ghost")``
  clipjax vmap       the same with ``method="vmap"``
  optax              ``jax.vmap(jax.grad(one example's loss))`` then
                     ``optax.per_example_global_norm_clip``
  jax_privacy        ``jax_privacy.clipped_grad`` (vmap over examples inside)
  nnx plain          the model as a Flax NNX module: ``nnx.grad(mean loss)``
  clipjax ghost nnx  ``per_example_clipped_grad`` given that module
  torch plain        ``loss.backward()``: no clipping, the PyTorch baseline
  opacus hooks       Opacus per-sample gradients by hooks (``make_private``,
                     grad_sample_mode="hooks"), then its optimizer's
                     ``clip_and_accumulate``; no noise, no optimizer step
  opacus ghost       Opacus ghost clipping (``make_private``,
                     grad_sample_mode="ghost"): two backward passes through
                     ``DPLossFastGradientClipping``; no noise, no optimizer step

The models: two ReLU MLPs with cross-entropy per example; a pre-LayerNorm
transformer block (4-head self-attention without mask, a GELU MLP, a 10-way
head on every token) whose per-example loss is the mean over its tokens of the
cross-entropy; six such blocks (without their heads) with their parameters
stacked along a leading axis and applied with ``jax.lax.scan`` (in NNX, blocks
made by ``nnx.vmap`` and run by ``nnx.scan``; in PyTorch, which has no scan, a
loop over six modules, as Opacus needs), then one head; a WRN-style CNN on
32x32x3 images without normalization (DP CNNs use GroupNorm or none): a 3x3
conv stem, pre-activation residual blocks of two 3x3 convs (one stage strided
by 2, with a 1x1 conv shortcut), mean pooling and a dense head; and a small
CNN on 8x8x1 digits (two 3x3 convs, the second strided by 2, a dense layer on
the flattened features). Each is written three times with the same weights:
a plain-JAX function of a params dict (dense layers ``x @ W + b``, convolutions
``lax.conv_general_dilated`` in NHWC/HWIO), a Flax NNX module (``nnx.Linear``,
``nnx.LayerNorm``, ``nnx.Conv``), and a ``torch.nn`` module (``nn.Linear``,
``nn.LayerNorm``, ``nn.Conv2d`` in NCHW). Inputs are random: the models' speed
does not depend on what the images show.

Each row's time is reported as a ratio to the plain step of its own framework,
measured in the same run: within JAX (with NNX) and within PyTorch, the methods
run round-robin, the order rotating every repetition, so drift in the
machine's speed hits all rows alike; the per-repetition ratios to the plain
step give quartiles as a noise measure. The JAX functions are jitted and
warmed up; inputs cycle through a small pool of distinct batches passed as
arguments. Before timing, the clipped sums of all methods are compared
(relative L2 error, loosely) and a warning is printed where one disagrees.

The rows that hold every example's gradient at once are skipped where those
would exceed ``--max-per-example-gb`` (on mlp-1024 they take 7.6 GB, and
several times that in peak memory); a row slower than ``--row-seconds`` over
all its repetitions stops early (after at least 3).

Each JAX and NNX row's memory is XLA's own account of its compiled step
(``jax.jit(f).lower(...).compile().memory_analysis()``: temporaries plus
outputs, the arguments left out), reported beside the plain step's.

The goals (issues 11 and 14): clipjax ghost at most 1.3x the plain JAX step on
the MLPs and on the scanned transformer, at most 1.5x on the CNNs, and faster
in absolute time than Opacus's ghost clipping on the same model. torch,
opacus, jax_privacy and flax are optional: their rows read "not installed"
without them.

Usage::

  python benchmarks/per_example.py                    # all models, full sizes
  python benchmarks/per_example.py --quick            # smoke test, tiny sizes
  python benchmarks/per_example.py --models mlp-512 --reps 50 --json r.json
  python benchmarks/per_example.py --models scan-transformer wrn-cnn digits-cnn
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import paired_quartiles

import clipjax

L2_CLIP = 1.0
# Relative L2 error allowed between two methods' clipped sums: within XLA, and
# between XLA and PyTorch, where a ReLU input within float32 rounding of zero
# can be on in one and off in the other for an example (seen once in 1024 on
# mlp-1024, moving the sum by 2e-3 while both sides were 4e-7 from float64).
CHECK_RTOL = {"xla": 1e-3, "torch": 1e-2}

JAX_METHODS = ["jax plain", "clipjax ghost", "clipjax vmap", "optax", "jax_privacy"]
NNX_METHODS = ["nnx plain", "clipjax ghost nnx"]
TORCH_METHODS = ["torch plain", "opacus hooks", "opacus ghost"]
METHODS = JAX_METHODS + NNX_METHODS + TORCH_METHODS
FRAMEWORK = {
  **dict.fromkeys(JAX_METHODS, "jax"),
  **dict.fromkeys(NNX_METHODS, "nnx"),
  **dict.fromkeys(TORCH_METHODS, "torch"),
}
PLAIN = {"jax": "jax plain", "nnx": "nnx plain", "torch": "torch plain"}
GHOST = {"jax": "clipjax ghost", "nnx": "clipjax ghost nnx"}
# The methods that hold every example's gradient at once (B x the model).
MATERIALIZING = ("clipjax vmap", "optax", "jax_privacy", "opacus hooks")


@dataclasses.dataclass(frozen=True)
class Model:
  """One benchmarked model: its kind, its sizes, its batch and its goal."""

  name: str
  kind: str  # "mlp", "transformer", "scan-transformer", "wrn" or "digits-cnn"
  batch: int
  widths: tuple[int, ...] = ()  # mlp: input, hidden..., classes
  seq: int = 0  # transformers: tokens per example
  dim: int = 0
  heads: int = 0
  hidden: int = 0
  blocks: int = 0  # scan-transformer: blocks in the stack
  image: tuple[int, int, int] = (0, 0, 0)  # CNNs: height, width, channels
  # wrn: the stem's (width, 1), then each residual block's (width, stride);
  # digits-cnn: each conv's (width, stride).
  convs: tuple[tuple[int, int], ...] = ()
  classes: int = 10
  goal: float | None = None  # the most clipjax ghost may take, x its plain step

  @property
  def tokens(self) -> bool:
    """Whether examples are sequences, their loss the mean over tokens."""
    return self.kind in ("transformer", "scan-transformer")

  @property
  def strides(self) -> tuple[int, ...]:
    return tuple(s for _, s in self.convs)

  def describe(self) -> str:
    if self.kind == "mlp":
      return f"MLP {'-'.join(map(str, self.widths))} (relu), batch {self.batch}"
    if self.tokens:
      stack = (
        "transformer block"
        if self.kind == "transformer"
        else f"{self.blocks} transformer blocks stacked and scanned (lax.scan;"
        " nnx.vmap + nnx.scan; a loop in torch), one head"
      )
      return (
        f"{stack}, batch {self.batch} x {self.seq} tokens, d={self.dim},"
        f" {self.heads} heads, MLP {self.hidden} (gelu), LayerNorm,"
        f" {self.classes}-way head per token"
      )
    h, w, c = self.image
    if self.kind == "wrn":
      (stem, _), *blocks = self.convs
      stages = ", ".join(
        f"{width}" + (f"/{stride}" if stride > 1 else "") for width, stride in blocks
      )
      return (
        f"WRN-style CNN on {h}x{w}x{c} (no normalization), batch {self.batch}:"
        f" conv3x3 {c}->{stem}, residual blocks of two conv3x3 ({stages};"
        " /2 = strided, 1x1 conv shortcut), relu, mean pool, dense"
      )
    layers, n_in = [], c
    for width, stride in self.convs:
      layers.append(f"conv3x3 {n_in}->{width}" + (f"/{stride}" if stride > 1 else ""))
      n_in = width
    return (
      f"digits CNN on {h}x{w}x{c}, batch {self.batch}: {', '.join(layers)}"
      " (relu), flatten, dense"
    )


MODELS = {
  "mlp-512": Model("mlp-512", "mlp", 256, widths=(784, 512, 512, 10), goal=1.3),
  "mlp-1024": Model("mlp-1024", "mlp", 1024, widths=(784, 1024, 1024, 10), goal=1.3),
  "transformer": Model(
    "transformer", "transformer", 32, seq=64, dim=128, heads=4, hidden=512
  ),
  "scan-transformer": Model(
    "scan-transformer",
    "scan-transformer",
    32,
    seq=64,
    dim=256,
    heads=4,
    hidden=1024,
    blocks=6,
    goal=1.3,
  ),
  "wrn-cnn": Model(
    "wrn-cnn",
    "wrn",
    64,
    image=(32, 32, 3),
    convs=((32, 1), (32, 1), (64, 2)),
    goal=1.5,
  ),
  "digits-cnn": Model(
    "digits-cnn", "digits-cnn", 64, image=(8, 8, 1), convs=((16, 1), (32, 2)), goal=1.5
  ),
}
QUICK_MODELS = {
  "mlp-512": Model("mlp-512", "mlp", 16, widths=(64, 32, 32, 10), goal=1.3),
  "mlp-1024": Model("mlp-1024", "mlp", 32, widths=(64, 48, 48, 10), goal=1.3),
  "transformer": Model(
    "transformer", "transformer", 4, seq=8, dim=16, heads=2, hidden=32
  ),
  "scan-transformer": Model(
    "scan-transformer",
    "scan-transformer",
    4,
    seq=8,
    dim=16,
    heads=2,
    hidden=32,
    blocks=2,
    goal=1.3,
  ),
  "wrn-cnn": Model(
    "wrn-cnn", "wrn", 4, image=(8, 8, 3), convs=((4, 1), (4, 1), (8, 2)), goal=1.5
  ),
  "digits-cnn": Model(
    "digits-cnn", "digits-cnn", 8, image=(8, 8, 1), convs=((4, 1), (8, 2)), goal=1.5
  ),
}


# ----------------------------------------------------------------- parameters


def init_params(model: Model, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """Host float32 params in JAX layout: dense ``{"w": (in, out), "b": (out,)}``."""
  rng = np.random.default_rng(seed)

  def dense(n_in, n_out):
    bound = 1.0 / math.sqrt(n_in)  # torch.nn.Linear's default range
    return {
      "w": rng.uniform(-bound, bound, (n_in, n_out)).astype(np.float32),
      "b": rng.uniform(-bound, bound, (n_out,)).astype(np.float32),
    }

  def layer_norm(n):
    return {
      "scale": (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32),
      "bias": (0.1 * rng.standard_normal(n)).astype(np.float32),
    }

  def conv(k, n_in, n_out):
    bound = 1.0 / math.sqrt(k * k * n_in)  # torch.nn.Conv2d's default range
    return {
      "w": rng.uniform(-bound, bound, (k, k, n_in, n_out)).astype(np.float32),
      "b": rng.uniform(-bound, bound, (n_out,)).astype(np.float32),
    }

  def block(d):
    return {
      "ln1": layer_norm(d),
      "q": dense(d, d),
      "k": dense(d, d),
      "v": dense(d, d),
      "o": dense(d, d),
      "ln2": layer_norm(d),
      "mlp_in": dense(d, model.hidden),
      "mlp_out": dense(model.hidden, d),
    }

  if model.kind == "mlp":
    w = model.widths
    return {f"dense_{i}": dense(w[i], w[i + 1]) for i in range(len(w) - 1)}
  if model.kind == "transformer":
    return {**block(model.dim), "head": dense(model.dim, model.classes)}
  if model.kind == "scan-transformer":
    blocks = [block(model.dim) for _ in range(model.blocks)]
    return {
      "blocks": jax.tree.map(lambda *xs: np.stack(xs), *blocks),
      "head": dense(model.dim, model.classes),
    }
  n_in = model.image[2]
  if model.kind == "wrn":
    (stem, _), *blocks = model.convs
    params = {"stem": conv(3, n_in, stem)}
    n_in = stem
    for i, (width, stride) in enumerate(blocks):
      p = {"conv_a": conv(3, n_in, width), "conv_b": conv(3, width, width)}
      if stride != 1 or width != n_in:
        p["shortcut"] = conv(1, n_in, width)
      params[f"block_{i + 1}"] = p
      n_in = width
    return {**params, "head": dense(n_in, model.classes)}
  params, (h, w) = {}, model.image[:2]
  for i, (width, stride) in enumerate(model.convs):
    params[f"conv_{i + 1}"] = conv(3, n_in, width)
    n_in, h, w = width, -(-h // stride), -(-w // stride)
  return {**params, "head": dense(h * w * n_in, model.classes)}


def make_batches(
  model: Model, pool: int, seed: int = 1
) -> list[tuple[np.ndarray, np.ndarray]]:
  """``pool`` distinct (inputs, integer labels) batches on the host."""
  rng = np.random.default_rng(seed)
  if model.kind == "mlp":
    x_shape, y_shape = (model.batch, model.widths[0]), (model.batch,)
  elif model.tokens:
    x_shape, y_shape = (model.batch, model.seq, model.dim), (model.batch, model.seq)
  else:  # images, NHWC
    x_shape, y_shape = (model.batch, *model.image), (model.batch,)
  return [
    (
      rng.standard_normal(x_shape).astype(np.float32),
      rng.integers(0, model.classes, y_shape).astype(np.int32),
    )
    for _ in range(pool)
  ]


# ------------------------------------------------------------------ JAX models


def _dense(x, p):
  return x @ p["w"] + p["b"]


def _layer_norm(x, p, eps=1e-5):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def mlp_logits(params, x):
  n = len(params)
  for i in range(n - 1):
    x = jax.nn.relu(_dense(x, params[f"dense_{i}"]))
  return _dense(x, params[f"dense_{n - 1}"])


def _block(params, x, *, heads):
  """A pre-LayerNorm transformer block: attention, then a GELU MLP."""
  b, t, d = x.shape
  h = _layer_norm(x, params["ln1"])
  q, k, v = (
    _dense(h, params[n]).reshape(b, t, heads, d // heads) for n in ("q", "k", "v")
  )
  scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d // heads)
  attn = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)
  x = x + _dense(attn.reshape(b, t, d), params["o"])
  h = jax.nn.gelu(_dense(_layer_norm(x, params["ln2"]), params["mlp_in"]), False)
  return x + _dense(h, params["mlp_out"])


def transformer_logits(params, x, *, heads):
  return _dense(_block(params, x, heads=heads), params["head"])


def scan_transformer_logits(params, x, *, heads):
  """The blocks' parameters stacked along axis 0, one slice per scan step."""

  def body(x, block):
    return _block(block, x, heads=heads), None

  x, _ = jax.lax.scan(body, x, params["blocks"])
  return _dense(x, params["head"])


def _conv(x, p, stride=1):
  """A KxK convolution in NHWC/HWIO, padded by (K - 1) / 2 as nn.Conv2d is."""
  pad = (p["w"].shape[0] - 1) // 2
  y = jax.lax.conv_general_dilated(
    x,
    p["w"],
    (stride, stride),
    [(pad, pad)] * 2,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  return y + p["b"]


def wrn_logits(params, x, *, strides):
  """Pre-activation residual blocks without normalization, mean pooling."""
  x = _conv(x, params["stem"])
  for i, stride in enumerate(strides[1:]):
    p = params[f"block_{i + 1}"]
    h = jax.nn.relu(x)
    y = _conv(jax.nn.relu(_conv(h, p["conv_a"], stride)), p["conv_b"])
    x = y + (_conv(h, p["shortcut"], stride) if "shortcut" in p else x)
  return _dense(jnp.mean(jax.nn.relu(x), axis=(1, 2)), params["head"])


def digits_cnn_logits(params, x, *, strides):
  for i, stride in enumerate(strides):
    x = jax.nn.relu(_conv(x, params[f"conv_{i + 1}"], stride))
  return _dense(x.reshape(x.shape[0], -1), params["head"])


def _logits_fn(model: Model) -> Callable[..., jax.Array]:
  if model.kind == "mlp":
    return mlp_logits
  if model.kind == "transformer":
    return functools.partial(transformer_logits, heads=model.heads)
  if model.kind == "scan-transformer":
    return functools.partial(scan_transformer_logits, heads=model.heads)
  if model.kind == "wrn":
    return functools.partial(wrn_logits, strides=model.strides)
  return functools.partial(digits_cnn_logits, strides=model.strides)


def make_loss(model: Model) -> Callable[..., jax.Array]:
  """``loss(params, x, y)``: per-example losses, shape (B,).

  Cross-entropy for the MLPs and CNNs; for the transformers, the mean over
  tokens of each token's cross-entropy.
  """
  logits_fn = _logits_fn(model)

  def loss(params, x, y):
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y)
    return jnp.mean(per_token, axis=-1) if model.tokens else per_token

  return loss


def jax_steps(loss: Callable[..., jax.Array]) -> dict[str, Callable[..., Any] | str]:
  """Method name -> jitted ``f(params, x, y)``, or a string saying why it is absent."""

  def mean_loss(params, x, y):
    return jnp.mean(loss(params, x, y))

  def one_example_loss(params, x, y):
    return loss(params, x[None], y[None])[0]

  def optax_clipped(params, x, y):
    grads = jax.vmap(jax.grad(one_example_loss), in_axes=(None, 0, 0))(params, x, y)
    return optax.per_example_global_norm_clip(grads, L2_CLIP)

  steps: dict[str, Callable[..., Any] | str] = {
    "jax plain": jax.jit(jax.grad(mean_loss))
  }
  clipped_grad = getattr(clipjax, "per_example_clipped_grad", None)
  for method in ("ghost", "vmap"):
    if clipped_grad is None:
      steps[f"clipjax {method}"] = "unavailable"
    else:
      try:
        steps[f"clipjax {method}"] = jax.jit(
          clipped_grad(loss, l2_clip=L2_CLIP, method=method)
        )
      except Exception as e:  # a method may refuse a model; say why
        steps[f"clipjax {method}"] = _error(e)
  steps["optax"] = jax.jit(optax_clipped)
  try:
    import jax_privacy
  except ImportError:
    steps["jax_privacy"] = "not installed"
  else:
    # keep_batch_dim=True (the default): mean_loss sees batches of one example.
    dp_grad = jax_privacy.clipped_grad(
      mean_loss, l2_clip_norm=L2_CLIP, batch_argnums=(1, 2)
    )
    steps["jax_privacy"] = jax.jit(lambda params, x, y: dp_grad(params, x, y))
  return steps


def _clipped_sum(method: str, out: Any) -> Any:
  """The gradient tree in a JAX or NNX method's output, in the params' layout."""
  if method not in ("jax plain", "jax_privacy", "nnx plain"):
    out = out[0]  # (grads, norms) or (grads, num_clipped)
  if method in NNX_METHODS:
    out = _from_nnx(out.to_pure_dict())
  return out


def _to_nnx(tree: dict[str, Any]) -> dict[str, Any]:
  """Params in JAX layout -> the NNX module's pure state (w, b -> kernel, bias)."""
  if "w" in tree:
    return {"kernel": tree["w"], "bias": tree["b"]}
  return {k: _to_nnx(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _from_nnx(tree: dict[str, Any]) -> dict[str, Any]:
  if "kernel" in tree:
    return {"w": tree["kernel"], "b": tree["bias"]}
  return {k: _from_nnx(v) if isinstance(v, dict) else v for k, v in tree.items()}


# ------------------------------------------------------------------ NNX models


def nnx_steps(model: Model) -> tuple[dict[str, Any], Callable[..., Any] | None]:
  """The NNX rows: method name -> jitted ``f(params, x, y)``, or why it is absent;
  and ``plan(params, x, y)``, the ghost row's plan for the module (or None).

  The module is rebuilt inside the jitted function from the same params dict
  as the plain-JAX rows (``nnx.merge`` on the renamed leaves; no runtime cost).
  """
  try:
    from flax import nnx
  except ImportError:
    return dict.fromkeys(NNX_METHODS, "not installed"), None

  graphdef = nnx.graphdef(_nnx_model(model, nnx))

  def as_module(params):
    return nnx.merge(graphdef, _to_nnx(params))

  def loss(module, x, y):
    per_token = optax.softmax_cross_entropy_with_integer_labels(module(x), y)
    return jnp.mean(per_token, axis=-1) if model.tokens else per_token

  def plain(params, x, y):
    return nnx.grad(lambda m: jnp.mean(loss(m, x, y)))(as_module(params))

  steps: dict[str, Any] = {"nnx plain": jax.jit(plain)}
  clipped_grad = getattr(clipjax, "per_example_clipped_grad", None)
  if clipped_grad is None:
    steps["clipjax ghost nnx"] = "unavailable"
    return steps, None
  ghost = clipped_grad(loss, l2_clip=L2_CLIP, method="ghost")
  steps["clipjax ghost nnx"] = jax.jit(
    lambda params, x, y: ghost(as_module(params), x, y)
  )
  return steps, lambda params, x, y: ghost.plan(as_module(params), x, y)


def _nnx_model(model: Model, nnx: Any) -> Any:
  """The NNX twin of the model's plain-JAX function (weights unset)."""
  rngs = nnx.Rngs(0)

  def dense(n_in, n_out, rngs=rngs):
    return nnx.Linear(n_in, n_out, rngs=rngs)

  def conv(k, n_in, n_out, stride=1):
    pad = (k - 1) // 2
    return nnx.Conv(
      n_in, n_out, (k, k), strides=stride, padding=[(pad, pad)] * 2, rngs=rngs
    )

  class Mlp(nnx.Module):
    def __init__(self, widths):
      self.n = len(widths) - 1
      for i in range(self.n):
        setattr(self, f"dense_{i}", dense(widths[i], widths[i + 1]))

    def __call__(self, x):
      for i in range(self.n - 1):
        x = jax.nn.relu(getattr(self, f"dense_{i}")(x))
      return getattr(self, f"dense_{self.n - 1}")(x)

  class Layer(nnx.Module):
    """``_block``: a transformer block without its head."""

    def __init__(self, m: Model, rngs: Any):
      d = m.dim
      self.heads = m.heads
      self.ln1 = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
      self.q, self.k, self.v, self.o = (dense(d, d, rngs) for _ in range(4))
      self.ln2 = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
      self.mlp_in = dense(d, m.hidden, rngs)
      self.mlp_out = dense(m.hidden, d, rngs)

    def __call__(self, x):
      b, t, d = x.shape
      h = self.ln1(x)
      q, k, v = (
        lin(h).reshape(b, t, self.heads, d // self.heads)
        for lin in (self.q, self.k, self.v)
      )
      scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d // self.heads)
      attn = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)
      x = x + self.o(attn.reshape(b, t, d))
      return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(x)), False))

  class Block(Layer):
    def __init__(self, m: Model):
      super().__init__(m, rngs)
      self.head = dense(m.dim, m.classes)

    def __call__(self, x):
      return self.head(super().__call__(x))

  class ScannedBlocks(nnx.Module):
    """Blocks made by nnx.vmap (params stacked on axis 0), run by nnx.scan."""

    def __init__(self, m: Model):
      @nnx.split_rngs(splits=m.blocks)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return Layer(m, rngs)

      self.blocks = make(rngs)
      self.head = dense(m.dim, m.classes)

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def run(x, block):
        return block(x)

      return self.head(run(x, self.blocks))

  class WrnBlock(nnx.Module):
    def __init__(self, n_in, width, stride):
      self.conv_a = conv(3, n_in, width, stride)
      self.conv_b = conv(3, width, width)
      if stride != 1 or width != n_in:
        self.shortcut = conv(1, n_in, width, stride)

    def __call__(self, x):
      h = jax.nn.relu(x)
      y = self.conv_b(jax.nn.relu(self.conv_a(h)))
      return y + (self.shortcut(h) if hasattr(self, "shortcut") else x)

  class Wrn(nnx.Module):
    def __init__(self, m: Model):
      (stem, _), *blocks = m.convs
      self.stem = conv(3, m.image[2], stem)
      self.n, n_in = len(blocks), stem
      for i, (width, stride) in enumerate(blocks):
        setattr(self, f"block_{i + 1}", WrnBlock(n_in, width, stride))
        n_in = width
      self.head = dense(n_in, m.classes)

    def __call__(self, x):
      x = self.stem(x)
      for i in range(self.n):
        x = getattr(self, f"block_{i + 1}")(x)
      return self.head(jnp.mean(jax.nn.relu(x), axis=(1, 2)))

  class DigitsCnn(nnx.Module):
    def __init__(self, m: Model):
      (h, w, n_in), self.n = m.image, len(m.convs)
      for i, (width, stride) in enumerate(m.convs):
        setattr(self, f"conv_{i + 1}", conv(3, n_in, width, stride))
        n_in, h, w = width, -(-h // stride), -(-w // stride)
      self.head = dense(h * w * n_in, m.classes)

    def __call__(self, x):
      for i in range(self.n):
        x = jax.nn.relu(getattr(self, f"conv_{i + 1}")(x))
      return self.head(x.reshape(x.shape[0], -1))

  if model.kind == "mlp":
    return Mlp(model.widths)
  kinds = {
    "transformer": Block,
    "scan-transformer": ScannedBlocks,
    "wrn": Wrn,
    "digits-cnn": DigitsCnn,
  }
  return kinds[model.kind](model)


# ---------------------------------------------------------------- torch models


def _leaf_paths(tree: dict[str, Any], prefix=()) -> dict[tuple[str, ...], Any]:
  """Nested dicts -> {(key, ..., leaf): array}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_leaf_paths(v, (*prefix, k)))
    else:
      out[(*prefix, k)] = v
  return out


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf != "w":
    return value
  # dense (in, out) -> (out, in); conv HWIO -> OIHW
  return value.T.copy() if value.ndim == 2 else value.transpose(3, 2, 0, 1).copy()


def _from_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf != "w":
    return value
  return value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)


def torch_model(model: Model, params: dict[str, Any]):
  """A ``torch.nn.Module`` holding ``params``, and where each leaf went.

  Returns ``(module, names)`` where ``names`` maps each JAX leaf path
  ``(layer, ..., leaf)`` to the torch parameter name holding it (weights
  transposed, conv kernels from HWIO to OIHW), or for a leaf stacked along
  the scan axis, the list of the names holding its slices.
  """
  import torch
  from torch import nn

  names: dict[tuple[str, ...], str | list[str]] = {}
  if model.kind == "mlp":
    w = model.widths
    layers: list[nn.Module] = []
    for i in range(len(w) - 1):
      layers.append(nn.Linear(w[i], w[i + 1]))
      if i < len(w) - 2:
        layers.append(nn.ReLU())
    module = nn.Sequential(*layers)
    for i in range(len(w) - 1):
      names[(f"dense_{i}", "w")] = f"{2 * i}.weight"
      names[(f"dense_{i}", "b")] = f"{2 * i}.bias"
  else:
    module = _torch_module(model)
    for path in _leaf_paths(params):
      *layers, leaf = path
      name = ".".join([*layers, "weight" if leaf in ("w", "scale") else "bias"])
      if layers[0] == "blocks":  # scan-transformer: blocks.<i>.<layer>
        names[path] = [
          name.replace("blocks.", f"blocks.{i}.", 1) for i in range(model.blocks)
        ]
      else:
        names[path] = name
  torch_params = dict(module.named_parameters())
  assert len(torch_params) == sum(
    len(n) if isinstance(n, list) else 1 for n in names.values()
  ), (sorted(torch_params), names)
  with torch.no_grad():
    for path, value in _leaf_paths(params).items():
      name = names[path]
      slices = (
        zip(name, value, strict=True) if isinstance(name, list) else [(name, value)]
      )
      for n, v in slices:
        torch_params[n].copy_(torch.from_numpy(_to_torch_layout(path[-1], v)))
  return module, names


def _torch_input(model: Model, x: np.ndarray) -> np.ndarray:
  """A host input batch in the torch model's layout (images NHWC -> NCHW).

  A copy, with fresh strides: ``np.ascontiguousarray`` keeps the transposed
  view of a one-channel image, whose strides torch also reads as channels-last;
  convolutions then answer in channels-last, and Opacus's ``unfold2d`` (which
  assumes NCHW strides) gives the next conv wrong per-sample gradients.
  """
  if model.kind in ("wrn", "digits-cnn"):
    return x.transpose(0, 3, 1, 2).copy()
  return x


def _torch_module(model: Model):
  from torch import nn

  class TorchLayer(nn.Module):
    """The JAX ``_block`` in nn.Linear and nn.LayerNorm layers."""

    def __init__(self, model: Model):
      super().__init__()
      d = model.dim
      self.heads = model.heads
      self.ln1 = nn.LayerNorm(d)
      self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
      self.ln2 = nn.LayerNorm(d)
      self.mlp_in = nn.Linear(d, model.hidden)
      self.mlp_out = nn.Linear(model.hidden, d)
      self.act = nn.GELU()

    def forward(self, x):
      b, t, d = x.shape
      h = self.ln1(x)
      q, k, v = (
        lin(h).reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
        for lin in (self.q, self.k, self.v)
      )
      scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
      attn = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
      x = x + self.o(attn)
      return x + self.mlp_out(self.act(self.mlp_in(self.ln2(x))))

  class TorchBlock(TorchLayer):
    """The JAX ``transformer_logits``."""

    def __init__(self, model: Model):
      super().__init__(model)
      self.head = nn.Linear(model.dim, model.classes)

    def forward(self, x):
      return self.head(super().forward(x))

  class TorchBlocks(nn.Module):
    """``scan_transformer_logits`` as a loop over per-block modules."""

    def __init__(self, model: Model):
      super().__init__()
      self.blocks = nn.ModuleList(TorchLayer(model) for _ in range(model.blocks))
      self.head = nn.Linear(model.dim, model.classes)

    def forward(self, x):
      for block in self.blocks:
        x = block(x)
      return self.head(x)

  def conv(k, n_in, n_out, stride=1):
    return nn.Conv2d(n_in, n_out, k, stride=stride, padding=(k - 1) // 2)

  class TorchWrnBlock(nn.Module):
    def __init__(self, n_in, width, stride):
      super().__init__()
      self.conv_a = conv(3, n_in, width, stride)
      self.conv_b = conv(3, width, width)
      self.shortcut = (
        conv(1, n_in, width, stride) if stride != 1 or width != n_in else None
      )

    def forward(self, x):
      h = x.relu()
      y = self.conv_b(self.conv_a(h).relu())
      return y + (self.shortcut(h) if self.shortcut is not None else x)

  class TorchWrn(nn.Module):
    """``wrn_logits`` in NCHW nn.Conv2d layers."""

    def __init__(self, model: Model):
      super().__init__()
      (stem, _), *blocks = model.convs
      self.stem = conv(3, model.image[2], stem)
      self.n, n_in = len(blocks), stem
      for i, (width, stride) in enumerate(blocks):
        setattr(self, f"block_{i + 1}", TorchWrnBlock(n_in, width, stride))
        n_in = width
      self.head = nn.Linear(n_in, model.classes)

    def forward(self, x):
      x = self.stem(x)
      for i in range(self.n):
        x = getattr(self, f"block_{i + 1}")(x)
      return self.head(x.relu().mean(dim=(2, 3)))

  class TorchDigitsCnn(nn.Module):
    """``digits_cnn_logits``; flattened in JAX's (h, w, c) order."""

    def __init__(self, model: Model):
      super().__init__()
      (h, w, n_in), self.n = model.image, len(model.convs)
      for i, (width, stride) in enumerate(model.convs):
        setattr(self, f"conv_{i + 1}", conv(3, n_in, width, stride))
        n_in, h, w = width, -(-h // stride), -(-w // stride)
      self.head = nn.Linear(h * w * n_in, model.classes)

    def forward(self, x):
      for i in range(self.n):
        x = getattr(self, f"conv_{i + 1}")(x).relu()
      return self.head(x.permute(0, 2, 3, 1).flatten(1))

  kinds = {
    "transformer": TorchBlock,
    "scan-transformer": TorchBlocks,
    "wrn": TorchWrn,
    "digits-cnn": TorchDigitsCnn,
  }
  return kinds[model.kind](model)


def torch_steps(
  model: Model, params: dict[str, Any], batch0: tuple[Any, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Method name -> ``step(x, y)`` (or why it is absent), and name -> grads getter.

  Each method gets its own copy of the module: Opacus attaches hooks to it.
  A step leaves the clipped sum (or the plain gradient) in place; the getter
  returns it as a JAX-layout tree of numpy arrays.
  """
  try:
    import torch
    from torch import nn
  except ImportError:
    return dict.fromkeys(TORCH_METHODS, "not installed"), {}

  torch.set_num_threads(_cpu_count())
  steps: dict[str, Any] = {}
  getters: dict[str, Any] = {}
  seq_shape = (model.batch, model.seq, model.classes) if model.tokens else None

  def flat(logits, y):
    # Per-token cross-entropy over (B*T, C); the mean over all tokens equals
    # the mean over examples of their per-token means (equal lengths).
    return logits.reshape(-1, model.classes), y.reshape(-1).long()

  def getter(module, names, attr):
    torch_params = dict(module.named_parameters())

    def grad(name, leaf):
      return _from_torch_layout(leaf, getattr(torch_params[name], attr).numpy())

    def get():
      tree: dict[str, Any] = {}
      for (*layers, leaf), name in names.items():
        node = tree
        for layer in layers:
          node = node.setdefault(layer, {})
        node[leaf] = (
          np.stack([grad(n, leaf) for n in name])
          if isinstance(name, list)
          else grad(name, leaf)
        )
      return tree

    return get

  module, names = torch_model(model, params)

  def plain_step(x, y, module=module):
    module.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(*flat(module(x), y)).backward()

  steps["torch plain"] = plain_step
  getters["torch plain"] = getter(module, names, "grad")

  try:
    from opacus import PrivacyEngine
  except ImportError:
    steps["opacus hooks"] = steps["opacus ghost"] = "not installed"
    return steps, getters

  def make_private(mode):
    module, names = torch_model(model, params)
    loader = torch.utils.data.DataLoader(
      torch.utils.data.TensorDataset(*batch0), batch_size=model.batch
    )
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # secure-mode and accountant notices
      private = PrivacyEngine().make_private(
        module=module,
        optimizer=torch.optim.SGD(module.parameters(), lr=0.0),
        data_loader=loader,
        criterion=nn.CrossEntropyLoss(),
        noise_multiplier=0.0,
        max_grad_norm=L2_CLIP,
        poisson_sampling=False,
        grad_sample_mode=mode,
      )
    return module, names, private

  module, names, (gsm, optimizer, _) = make_private("hooks")

  def hooks_step(x, y, gsm=gsm, optimizer=optimizer):
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(*flat(gsm(x), y)).backward()
    optimizer.clip_and_accumulate()  # the clipped sum lands in p.summed_grad

  steps["opacus hooks"] = hooks_step
  getters["opacus hooks"] = getter(module, names, "summed_grad")

  module, names, (gsm, optimizer, criterion, _) = make_private("ghost")

  def ghost_step(x, y, gsm=gsm, optimizer=optimizer, criterion=criterion):
    optimizer.zero_grad(set_to_none=True)
    # Two backward passes: norms, then the clipped sum into p.grad.
    criterion(*flat(gsm(x), y), shape=seq_shape).backward()

  steps["opacus ghost"] = ghost_step
  getters["opacus ghost"] = getter(module, names, "grad")
  return steps, getters


# ---------------------------------------------------------------------- timing


def round_robin(
  runners: dict[str, Callable[[int], float]],
  reps: int,
  warmup: int,
  row_seconds: float = math.inf,
) -> dict[str, list[float]]:
  """Seconds per call of each runner, all runners once per repetition.

  The order rotates every repetition, so no runner always follows the same
  one; ``runner(i)`` runs repetition ``i`` and returns the seconds it took.
  A runner whose last warm-up call took over ``row_seconds / reps`` drops out
  after about ``row_seconds`` (but not before 3 repetitions), so that the first
  ``len(times[name])`` repetitions of every runner ran in the same rounds.
  """
  names = list(runners)
  last = dict.fromkeys(names, 0.0)
  for i in range(warmup):
    for name in names:
      last[name] = runners[name](i)
  limit = {n: min(reps, max(3, int(row_seconds / max(last[n], 1e-9)))) for n in names}
  times: dict[str, list[float]] = {name: [] for name in names}
  for i in range(reps):
    shift = i % len(names)
    for name in names[shift:] + names[:shift]:
      if i < limit[name]:
        times[name].append(runners[name](i))
  return times


def _cpu_count() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def _rel_err(a: Any, b: Any) -> float:
  va = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]).astype(np.float64)
  vb = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)]).astype(np.float64)
  return float(np.linalg.norm(va - vb) / max(np.linalg.norm(vb), 1e-30))


def run_model(
  model: Model,
  reps: int,
  warmup: int,
  pool: int,
  max_per_example_gb: float = math.inf,
  row_seconds: float = math.inf,
) -> dict[str, Any]:
  host_params = init_params(model)
  host_batches = make_batches(model, pool)
  loss = make_loss(model)
  params = jax.tree.map(jnp.asarray, host_params)
  batches = [tuple(jnp.asarray(a) for a in b) for b in host_batches]
  n_params = int(sum(x.size for x in jax.tree.leaves(host_params)))

  nsteps, nnx_plan = nnx_steps(model)
  jsteps = {**jax_steps(loss), **nsteps}
  status = {m: s for m, s in jsteps.items() if isinstance(s, str)}
  per_example_gb = model.batch * n_params * 4 / 1e9
  if per_example_gb > max_per_example_gb:
    for method in MATERIALIZING:
      status.setdefault(
        method,
        f"skipped: its per-example gradients take {per_example_gb:.1f} GB"
        f" (> --max-per-example-gb {max_per_example_gb:g})",
      )
  try:
    import torch

    torch_batches = [
      (
        torch.from_numpy(_torch_input(model, x)),
        torch.from_numpy(y.astype(np.int64)),
      )
      for x, y in host_batches
    ]
  except ImportError:
    torch_batches = []
  tsteps, getters = torch_steps(
    model, host_params, torch_batches[0] if torch_batches else None
  )
  for method, step in tsteps.items():
    if isinstance(step, str):
      status[method] = step  # "not installed" outranks "skipped"

  # One call of each on the first batch: compiles, and gives the sums to check.
  sums: dict[str, Any] = {}
  memory: dict[str, int] = {}
  norms = None
  for method, step in jsteps.items():
    if method in status:
      continue
    try:
      out = jax.block_until_ready(step(params, *batches[0]))
    except Exception as e:
      status[method] = _error(e)
      continue
    sums[method] = jax.tree.map(np.asarray, _clipped_sum(method, out))
    memory[method] = _compiled_bytes(step, params, batches[0])
    if method.startswith("clipjax") and norms is None:
      norms = np.asarray(out[1])
  for method, step in tsteps.items():
    if method in status:
      continue
    try:
      step(*torch_batches[0])
    except Exception as e:
      status[method] = _error(e)
      continue
    sums[method] = getters[method]()

  checks = _check_sums(sums)
  if norms is None:
    norms = _norms_by_vmap(loss, params, batches[0], n_params)
  ghost = getattr(clipjax, "per_example_clipped_grad", None)
  plans = {
    "jax": _ghost_plan(
      ghost and (lambda *a: ghost(loss, l2_clip=L2_CLIP, method="ghost").plan(*a)),
      params,
      batches[0],
    ),
    "nnx": _ghost_plan(nnx_plan, params, batches[0]),
  }

  def jax_runner(step):
    def run(i):
      args = (params, *batches[i % len(batches)])
      start = time.perf_counter()
      jax.block_until_ready(step(*args))
      return time.perf_counter() - start

    return run

  def torch_runner(step):
    def run(i):
      args = torch_batches[i % len(torch_batches)]
      start = time.perf_counter()
      step(*args)
      return time.perf_counter() - start

    return run

  times: dict[str, list[float]] = {}
  for steps, runner in ((jsteps, jax_runner), (tsteps, torch_runner)):
    live = {m: runner(s) for m, s in steps.items() if m not in status}
    if live:
      times.update(round_robin(live, reps, warmup, row_seconds))

  rows = []
  for method in METHODS:
    framework = FRAMEWORK[method]
    row: dict[str, Any] = {
      "model": model.name,
      "method": method,
      "framework": framework,
    }
    if method not in times:
      row["status"] = status.get(method, "unavailable")
      rows.append(row)
      continue
    plain = PLAIN[framework]
    n = len(times[method])
    ms = statistics.median(times[method]) * 1e3
    row.update(status="ok", ms=ms, min_ms=min(times[method]) * 1e3, reps=n)
    if method in memory:
      row["memory_mb"] = memory[method] / 2**20
    if plain in times:
      row["ratio"] = ms / (statistics.median(times[plain]) * 1e3)
      q25, q75 = paired_quartiles(times[method], times[plain][:n])
      row.update(pair_ratio_q25=q25, pair_ratio_q75=q75)
    rows.append(row)
  return {
    "model": model.name,
    "description": model.describe(),
    "params": n_params,
    "batch": model.batch,
    "median_example_norm": float(np.median(norms)),
    "fraction_clipped": float(np.mean(norms > L2_CLIP)),
    "goal": model.goal,
    "checks": checks,
    "ghost_plan": plans["jax"] and _count_ways(plans["jax"]),
    "ghost_plan_nnx": plans["nnx"] and _count_ways(plans["nnx"]),
    "ghost_plan_leaves": plans,
    "memory": _memory_summary(memory),
    "rows": rows,
  }


def _error(e: Exception) -> str:
  first = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"error: {type(e).__name__}: {first[:200]}"


def _ghost_plan(plan, params, batch) -> dict[str, str] | None:
  """Each parameter leaf -> how clipjax's ghost path handles it, or None."""
  if plan is None:
    return None
  try:
    return {str(k): v for k, v in plan(params, *batch).items()}
  except Exception:  # no plan: the ghost row says what went wrong
    return None


def _count_ways(plan: dict[str, str]) -> dict[str, int]:
  ways = list(plan.values())
  return {way: ways.count(way) for way in sorted(set(ways))}


def _compiled_bytes(step, params, batch) -> int:
  """XLA's peak for one compiled step: its temporaries and outputs.

  The arguments (params and batch, the same for every row) are left out. The
  compilation is the one the first call made (jit's cache).
  """
  stats = step.lower(params, *batch).compile().memory_analysis()
  return int(stats.temp_size_in_bytes + stats.output_size_in_bytes)


def _memory_summary(memory: dict[str, int]) -> dict[str, dict[str, float]]:
  """Per framework, the ghost step's memory against the plain step's, in MiB."""
  out = {}
  for framework, ghost in GHOST.items():
    plain = PLAIN[framework]
    if ghost in memory and plain in memory:
      out[framework] = {
        "ghost_mb": memory[ghost] / 2**20,
        "plain_mb": memory[plain] / 2**20,
        "ratio": memory[ghost] / max(memory[plain], 1),
      }
  return out


def _norms_by_vmap(loss, params, batch, n_params: int) -> np.ndarray:
  """Per-example gradient norms, in chunks of at most ~256 MB of gradients."""

  @jax.jit
  def norms(params, x, y):
    def one(params, x, y):
      return loss(params, x[None], y[None])[0]

    grads = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)
    return jax.vmap(optax.tree.norm)(grads)

  chunk = max(1, int(256e6 // (4 * n_params)))
  x, y = batch
  return np.concatenate(
    [norms(params, x[i : i + chunk], y[i : i + chunk]) for i in range(0, len(x), chunk)]
  )


def _crosses(a: str, b: str) -> bool:
  return (a in TORCH_METHODS) != (b in TORCH_METHODS)


def _check_sums(sums: dict[str, Any]) -> list[dict[str, Any]]:
  """Each clipped sum against the first clipped JAX one: relative L2 error."""
  clipped = [m for m in sums if m not in PLAIN.values()]
  if not clipped:
    return []
  reference = next((m for m in clipped if m in JAX_METHODS), clipped[0])
  return [
    {
      "method": m,
      "reference": reference,
      "rel_err": (err := _rel_err(sums[m], sums[reference])),
      "rtol": (rtol := CHECK_RTOL["torch" if _crosses(m, reference) else "xla"]),
      "ok": err <= rtol,
    }
    for m in clipped
    if m != reference
  ]


# --------------------------------------------------------------------- reports

_HEADER = (
  f"{'method':<18} {'ms/step':>10} {'ratio':>7}   {'paired q25-q75':<14}"
  f" {'XLA MiB':>9}   ratio to"
)


def _quartiles(r: dict[str, Any]) -> str:
  if "ratio" not in r or r["method"] in PLAIN.values():
    return "-"
  return f"{r['pair_ratio_q25']:.2f}-{r['pair_ratio_q75']:.2f}"


def _mib(mb: float) -> str:
  return f"{mb:.2f}" if mb < 100 else f"{mb:.1f}"


def _memory(r: dict[str, Any]) -> str:
  return _mib(r["memory_mb"]) if "memory_mb" in r else "-"


def _row(r: dict[str, Any]) -> str:
  if r["status"] != "ok":
    return f"{r['method']:<18} {r['status']}"
  ratio = f"{r['ratio']:>7.2f}" if "ratio" in r else f"{'-':>7}"
  return (
    f"{r['method']:<18} {r['ms']:>10.2f} {ratio}   {_quartiles(r):<14}"
    f" {_memory(r):>9}   {PLAIN[r['framework']]}"
  )


def _verdicts(result: dict[str, Any]) -> list[str]:
  """The goals, met or missed: for the JAX and the NNX ghost rows, the ratio
  to their own plain step (where the model has a goal) and the time against
  Opacus ghost."""
  rows = {r["method"]: r for r in result["rows"]}
  theirs = rows["opacus ghost"]
  goal = result.get("goal")
  lines = []
  for framework, name in GHOST.items():
    ghost = rows[name]
    if ghost["status"] != "ok":
      continue
    if goal is not None and "ratio" in ghost:
      met = "met" if ghost["ratio"] <= goal else "NOT met"
      lines.append(
        f"goal: {name} <= {goal}x {PLAIN[framework]}: {met} ({ghost['ratio']:.2f}x)"
      )
    if theirs["status"] == "ok":
      met = "met" if ghost["ms"] < theirs["ms"] else "NOT met"
      lines.append(
        f"goal: {name} faster than opacus ghost: {met} ({ghost['ms']:.2f} ms"
        f" vs {theirs['ms']:.2f} ms, {theirs['ms'] / ghost['ms']:.2f}x)"
      )
  return lines


def _memory_lines(result: dict[str, Any]) -> list[str]:
  return [
    f"memory (XLA temporaries + outputs): {GHOST[f]} {_mib(m['ghost_mb'])} MiB vs"
    f" {PLAIN[f]} {_mib(m['plain_mb'])} MiB ({m['ratio']:.2f}x)"
    for f, m in result["memory"].items()
  ]


def _plan_line(plan: dict[str, int]) -> str:
  return ", ".join(f"{n} {way.removeprefix('ghost: ')}" for way, n in plan.items())


def _print_model(result: dict[str, Any]) -> None:
  print(
    f"\n== {result['model']}: {result['description']}; {result['params']:,} params =="
  )
  print(
    f"per-example gradient norms: median {result['median_example_norm']:.3g},"
    f" {100 * result['fraction_clipped']:.0f}% above the bound {L2_CLIP}"
  )
  if result["ghost_plan"]:
    print(f"clipjax ghost plan (parameter leaves): {_plan_line(result['ghost_plan'])}")
  if result["ghost_plan_nnx"]:
    print(
      "clipjax ghost nnx plan (parameter leaves):"
      f" {_plan_line(result['ghost_plan_nnx'])}"
    )
  for c in result["checks"]:
    if not c["ok"]:
      print(
        f"WARNING: {c['method']}'s clipped sum differs from {c['reference']}'s:"
        f" relative L2 error {c['rel_err']:.2e} > {c['rtol']:g}"
      )
  if result["checks"] and all(c["ok"] for c in result["checks"]):
    worst = max(result["checks"], key=lambda c: c["rel_err"])
    print(
      f"clipped sums agree with {worst['reference']}'s: {len(result['checks'])}"
      f" methods, largest relative L2 error {worst['rel_err']:.1e}"
      f" ({worst['method']}, bound {worst['rtol']:g})"
    )
  print(_HEADER)
  for r in result["rows"]:
    print(_row(r))
  for line in _memory_lines(result) + _verdicts(result):
    print(line)
  sys.stdout.flush()


def _markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
  lines = [f"Machine: {meta['machine_line']}", ""]
  for result in results:
    lines += [
      f"**{result['model']}**: {result['description']} ({result['params']:,} params)",
      "",
      "| method | ms/step (median) | ratio to its plain step | paired q25-q75"
      " | XLA temp + output MiB |",
      "|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
      if r["status"] != "ok":
        lines.append(f"| {r['method']} | {r['status']} | | | |")
        continue
      ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
      lines.append(
        f"| {r['method']} | {r['ms']:.2f} | {ratio} ({PLAIN[r['framework']]})"
        f" | {_quartiles(r)} | {_memory(r)} |"
      )
    plans = [
      f"{GHOST[f]} plan: {_plan_line(p)}"
      for f, p in (("jax", result["ghost_plan"]), ("nnx", result["ghost_plan_nnx"]))
      if p
    ]
    lines += [
      "",
      *(f"- {v}" for v in plans + _memory_lines(result) + _verdicts(result)),
      "",
    ]
  return "\n".join(lines)


def _versions() -> dict[str, str]:
  versions = {
    "python": sys.version.split()[0],
    "jax": jax.__version__,
    "optax": optax.__version__,
    "clipjax": clipjax.__version__,
  }
  for name in ("flax", "torch", "opacus", "jax_privacy"):
    try:
      module = __import__(name)
    except ImportError:
      versions[name] = "not installed"
    else:
      versions[name] = getattr(module, "__version__", "?")
  return versions


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--quick", action="store_true", help="tiny models and few reps (smoke test)"
  )
  parser.add_argument(
    "--reps", type=int, default=None, help="timed calls per method (default 20)"
  )
  parser.add_argument(
    "--models",
    nargs="+",
    choices=list(MODELS),
    default=list(MODELS),
    help="which models (default: all)",
  )
  parser.add_argument(
    "--max-per-example-gb",
    type=float,
    default=4.0,
    help="skip the rows that hold all per-example gradients at once when these"
    " would take more (default 4; they need several times this in memory)",
  )
  parser.add_argument(
    "--row-seconds",
    type=float,
    default=60.0,
    help="a slow row stops repeating after about this long, after at least 3"
    " reps (default 60)",
  )
  parser.add_argument("--json", metavar="PATH", help="also write the results here")
  parser.add_argument("--markdown", metavar="PATH", help="also write markdown tables")
  args = parser.parse_args(argv)
  # Opacus's hooks trip this on every model whose inputs need no gradient.
  warnings.filterwarnings("ignore", message="Full backward hook is firing")

  models = QUICK_MODELS if args.quick else MODELS
  reps, warmup, pool = (3, 1, 2) if args.quick else (20, 2, 3)
  if args.reps is not None:
    if args.reps < 1:
      parser.error(f"--reps={args.reps} must be at least 1")
    reps = args.reps

  versions = _versions()
  cpus = _cpu_count()
  machine = (
    f"{platform.platform()}, {platform.machine()}, {cpus} CPUs,"
    f" jax device {jax.devices()[0].device_kind}; "
    + ", ".join(f"{k} {v}" for k, v in versions.items())
  )
  print(machine)
  print(
    f"per-example clip {L2_CLIP}; {reps} round-robin reps per method (after"
    f" {warmup} warm-up), {pool} distinct batches; torch threads {cpus}"
  )
  if not hasattr(clipjax, "per_example_clipped_grad"):
    print("clipjax.per_example_clipped_grad is unavailable in this clipjax")

  results = []
  for name in args.models:
    results.append(
      run_model(
        models[name], reps, warmup, pool, args.max_per_example_gb, args.row_seconds
      )
    )
    _print_model(results[-1])

  meta = {
    "machine_line": machine,
    "platform": platform.platform(),
    "cpus": cpus,
    "device": jax.devices()[0].device_kind,
    **versions,
    "l2_clip": L2_CLIP,
    "reps": reps,
    "warmup": warmup,
    "pool": pool,
    "quick": args.quick,
    "max_per_example_gb": args.max_per_example_gb,
    "row_seconds": args.row_seconds,
  }
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "results": results}, f, indent=2)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(_markdown(meta, results))
  return 0


if __name__ == "__main__":
  sys.exit(main())

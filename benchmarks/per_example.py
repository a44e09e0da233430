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

The models: two ReLU MLPs with cross-entropy per example, and a pre-LayerNorm
transformer block (4-head self-attention without mask, a GELU MLP, a 10-way
head on every token) whose per-example loss is the mean over its tokens of the
cross-entropy. Each is written three times with the same weights: a plain-JAX
function of a params dict (dense layers ``x @ W + b``), a Flax NNX module, and
a ``torch.nn`` module (``nn.Linear``, ``nn.LayerNorm``).

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

The issue's goals: clipjax ghost at most 1.3x the plain JAX step on the MLPs,
and faster in absolute time than Opacus's ghost clipping on the same model.
torch, opacus, jax_privacy and flax are optional: their rows read "not
installed" without them.

Usage::

  python benchmarks/per_example.py                    # all models, full sizes
  python benchmarks/per_example.py --quick            # smoke test, tiny sizes
  python benchmarks/per_example.py --models mlp-512 --reps 50 --json r.json
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
GOAL_RATIO = 1.3  # clipjax ghost / jax plain, on the MLPs

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
# The methods that hold every example's gradient at once (B x the model).
MATERIALIZING = ("clipjax vmap", "optax", "jax_privacy", "opacus hooks")


@dataclasses.dataclass(frozen=True)
class Model:
  """One benchmarked model: its kind, its sizes and its batch."""

  name: str
  kind: str  # "mlp" or "transformer"
  batch: int
  widths: tuple[int, ...] = ()  # mlp: input, hidden..., classes
  seq: int = 0  # transformer: tokens per example
  dim: int = 0
  heads: int = 0
  hidden: int = 0
  classes: int = 10

  def describe(self) -> str:
    if self.kind == "mlp":
      return f"MLP {'-'.join(map(str, self.widths))} (relu), batch {self.batch}"
    return (
      f"transformer block, batch {self.batch} x {self.seq} tokens, d={self.dim},"
      f" {self.heads} heads, MLP {self.hidden} (gelu), LayerNorm, {self.classes}-way"
      " head per token"
    )


MODELS = {
  "mlp-512": Model("mlp-512", "mlp", 256, widths=(784, 512, 512, 10)),
  "mlp-1024": Model("mlp-1024", "mlp", 1024, widths=(784, 1024, 1024, 10)),
  "transformer": Model(
    "transformer", "transformer", 32, seq=64, dim=128, heads=4, hidden=512
  ),
}
QUICK_MODELS = {
  "mlp-512": Model("mlp-512", "mlp", 16, widths=(64, 32, 32, 10)),
  "mlp-1024": Model("mlp-1024", "mlp", 32, widths=(64, 48, 48, 10)),
  "transformer": Model(
    "transformer", "transformer", 4, seq=8, dim=16, heads=2, hidden=32
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

  if model.kind == "mlp":
    w = model.widths
    return {f"dense_{i}": dense(w[i], w[i + 1]) for i in range(len(w) - 1)}
  d = model.dim
  return {
    "ln1": layer_norm(d),
    "q": dense(d, d),
    "k": dense(d, d),
    "v": dense(d, d),
    "o": dense(d, d),
    "ln2": layer_norm(d),
    "mlp_in": dense(d, model.hidden),
    "mlp_out": dense(model.hidden, d),
    "head": dense(d, model.classes),
  }


def make_batches(
  model: Model, pool: int, seed: int = 1
) -> list[tuple[np.ndarray, np.ndarray]]:
  """``pool`` distinct (inputs, integer labels) batches on the host."""
  rng = np.random.default_rng(seed)
  if model.kind == "mlp":
    x_shape, y_shape = (model.batch, model.widths[0]), (model.batch,)
  else:
    x_shape, y_shape = (model.batch, model.seq, model.dim), (model.batch, model.seq)
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


def transformer_logits(params, x, *, heads):
  b, t, d = x.shape
  h = _layer_norm(x, params["ln1"])
  q, k, v = (
    _dense(h, params[n]).reshape(b, t, heads, d // heads) for n in ("q", "k", "v")
  )
  scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d // heads)
  attn = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)
  x = x + _dense(attn.reshape(b, t, d), params["o"])
  h = jax.nn.gelu(_dense(_layer_norm(x, params["ln2"]), params["mlp_in"]), False)
  x = x + _dense(h, params["mlp_out"])
  return _dense(x, params["head"])


def make_loss(model: Model) -> Callable[..., jax.Array]:
  """``loss(params, x, y)``: per-example losses, shape (B,).

  Cross-entropy for the MLPs; for the transformer, the mean over tokens of
  each token's cross-entropy.
  """
  if model.kind == "mlp":

    def loss(params, x, y):
      logits = mlp_logits(params, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  else:
    logits_fn = functools.partial(transformer_logits, heads=model.heads)

    def loss(params, x, y):
      per_token = optax.softmax_cross_entropy_with_integer_labels(
        logits_fn(params, x), y
      )
      return jnp.mean(per_token, axis=-1)

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
    out = {
      layer: {"w": p["kernel"], "b": p["bias"]} if "kernel" in p else p
      for layer, p in out.to_pure_dict().items()
    }
  return out


# ------------------------------------------------------------------ NNX models


def nnx_steps(model: Model) -> dict[str, Any]:
  """The NNX rows: method name -> jitted ``f(params, x, y)``, or why it is absent.

  The module is rebuilt inside the jitted function from the same params dict
  as the plain-JAX rows (``nnx.merge`` on the renamed leaves; no runtime cost).
  """
  try:
    from flax import nnx
  except ImportError:
    return dict.fromkeys(NNX_METHODS, "not installed")

  graphdef = nnx.graphdef(_nnx_model(model, nnx))

  def as_module(params):
    return nnx.merge(
      graphdef,
      {
        layer: {"kernel": p["w"], "bias": p["b"]} if "w" in p else p
        for layer, p in params.items()
      },
    )

  def loss(module, x, y):
    per_token = optax.softmax_cross_entropy_with_integer_labels(module(x), y)
    return per_token if model.kind == "mlp" else jnp.mean(per_token, axis=-1)

  def plain(params, x, y):
    return nnx.grad(lambda m: jnp.mean(loss(m, x, y)))(as_module(params))

  steps: dict[str, Any] = {"nnx plain": jax.jit(plain)}
  clipped_grad = getattr(clipjax, "per_example_clipped_grad", None)
  if clipped_grad is None:
    steps["clipjax ghost nnx"] = "unavailable"
  else:
    ghost = clipped_grad(loss, l2_clip=L2_CLIP, method="ghost")
    steps["clipjax ghost nnx"] = jax.jit(
      lambda params, x, y: ghost(as_module(params), x, y)
    )
  return steps


def _nnx_model(model: Model, nnx: Any) -> Any:
  """The NNX twin of ``mlp_logits`` or ``transformer_logits`` (weights unset)."""
  rngs = nnx.Rngs(0)

  def dense(n_in, n_out):
    return nnx.Linear(n_in, n_out, rngs=rngs)

  class Mlp(nnx.Module):
    def __init__(self, widths):
      self.n = len(widths) - 1
      for i in range(self.n):
        setattr(self, f"dense_{i}", dense(widths[i], widths[i + 1]))

    def __call__(self, x):
      for i in range(self.n - 1):
        x = jax.nn.relu(getattr(self, f"dense_{i}")(x))
      return getattr(self, f"dense_{self.n - 1}")(x)

  class Block(nnx.Module):
    def __init__(self, m: Model):
      d = m.dim
      self.heads = m.heads
      self.ln1 = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
      self.q, self.k, self.v, self.o = (dense(d, d) for _ in range(4))
      self.ln2 = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
      self.mlp_in = dense(d, m.hidden)
      self.mlp_out = dense(m.hidden, d)
      self.head = dense(d, m.classes)

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
      x = x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(x)), False))
      return self.head(x)

  return Mlp(model.widths) if model.kind == "mlp" else Block(model)


# ---------------------------------------------------------------- torch models


def torch_model(model: Model, params: dict[str, dict[str, np.ndarray]]):
  """A ``torch.nn.Module`` holding ``params``, and where each leaf went.

  Returns ``(module, names)`` where ``names`` maps each JAX leaf path
  ``(layer, leaf)`` to the torch parameter name holding it (weights transposed).
  """
  import torch
  from torch import nn

  if model.kind == "mlp":
    w = model.widths
    layers: list[nn.Module] = []
    for i in range(len(w) - 1):
      layers.append(nn.Linear(w[i], w[i + 1]))
      if i < len(w) - 2:
        layers.append(nn.ReLU())
    module = nn.Sequential(*layers)
    names = {}
    for i in range(len(w) - 1):
      names[(f"dense_{i}", "w")] = f"{2 * i}.weight"
      names[(f"dense_{i}", "b")] = f"{2 * i}.bias"
  else:
    module = _torch_block(model)
    names = {}
    for layer in params:
      torch_leaves = ("weight", "bias")
      jax_leaves = ("scale", "bias") if layer.startswith("ln") else ("w", "b")
      for j, t in zip(jax_leaves, torch_leaves, strict=True):
        names[(layer, j)] = f"{layer}.{t}"
  torch_params = dict(module.named_parameters())
  with torch.no_grad():
    for (layer, leaf), name in names.items():
      value = params[layer][leaf]
      torch_params[name].copy_(
        torch.from_numpy(value.T.copy() if leaf == "w" else value)
      )
  return module, names


def _torch_block(model: Model):
  from torch import nn

  class TorchBlock(nn.Module):
    """The JAX ``transformer_logits`` in nn.Linear and nn.LayerNorm layers."""

    def __init__(self, model: Model):
      super().__init__()
      d = model.dim
      self.heads = model.heads
      self.ln1 = nn.LayerNorm(d)
      self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
      self.ln2 = nn.LayerNorm(d)
      self.mlp_in = nn.Linear(d, model.hidden)
      self.mlp_out = nn.Linear(model.hidden, d)
      self.head = nn.Linear(d, model.classes)
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
      x = x + self.mlp_out(self.act(self.mlp_in(self.ln2(x))))
      return self.head(x)

  return TorchBlock(model)


def torch_steps(
  model: Model, params: dict[str, dict[str, np.ndarray]], batch0: tuple[Any, Any]
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
  seq_shape = None if model.kind == "mlp" else (model.batch, model.seq, model.classes)

  def flat(logits, y):
    # Per-token cross-entropy over (B*T, C); the mean over all tokens equals
    # the mean over examples of their per-token means (equal lengths).
    return logits.reshape(-1, model.classes), y.reshape(-1).long()

  def getter(module, names, attr):
    torch_params = dict(module.named_parameters())

    def get():
      tree: dict[str, dict[str, np.ndarray]] = {}
      for (layer, leaf), name in names.items():
        g = getattr(torch_params[name], attr).detach().numpy()
        tree.setdefault(layer, {})[leaf] = g.T if leaf == "w" else g
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

  jsteps = {**jax_steps(loss), **nnx_steps(model)}
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
      (torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
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
  plan = _ghost_plan(loss, params, batches[0])

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
    "checks": checks,
    "ghost_plan": plan,
    "rows": rows,
  }


def _error(e: Exception) -> str:
  first = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"error: {type(e).__name__}: {first[:200]}"


def _ghost_plan(loss, params, batch) -> dict[str, int] | None:
  """How many parameter leaves clipjax's ghost path handles each way."""
  clipped_grad = getattr(clipjax, "per_example_clipped_grad", None)
  if clipped_grad is None:
    return None
  try:
    ghost = clipped_grad(loss, l2_clip=L2_CLIP, method="ghost")
    ways = list(ghost.plan(params, *batch).values())
  except Exception:  # no plan: the ghost row says what went wrong
    return None
  return {way: ways.count(way) for way in sorted(set(ways))}


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
  f"{'method':<18} {'ms/step':>10} {'ratio':>7}   {'paired q25-q75':<14}   ratio to"
)


def _quartiles(r: dict[str, Any]) -> str:
  if "ratio" not in r or r["method"] in PLAIN.values():
    return "-"
  return f"{r['pair_ratio_q25']:.2f}-{r['pair_ratio_q75']:.2f}"


def _row(r: dict[str, Any]) -> str:
  if r["status"] != "ok":
    return f"{r['method']:<18} {r['status']}"
  ratio = f"{r['ratio']:>7.2f}" if "ratio" in r else f"{'-':>7}"
  return (
    f"{r['method']:<18} {r['ms']:>10.2f} {ratio}   {_quartiles(r):<14}"
    f"   {PLAIN[r['framework']]}"
  )


def _verdicts(result: dict[str, Any]) -> list[str]:
  rows = {r["method"]: r for r in result["rows"]}
  ghost, theirs = rows["clipjax ghost"], rows["opacus ghost"]
  lines = []
  on_mlp = result["model"].startswith("mlp")
  if on_mlp and ghost["status"] == "ok" and "ratio" in ghost:
    met = "met" if ghost["ratio"] <= GOAL_RATIO else "NOT met"
    lines.append(
      f"goal: clipjax ghost <= {GOAL_RATIO}x jax plain: {met} ({ghost['ratio']:.2f}x)"
    )
  if ghost["status"] == "ok" and theirs["status"] == "ok":
    met = "met" if ghost["ms"] < theirs["ms"] else "NOT met"
    lines.append(
      f"goal: clipjax ghost faster than opacus ghost: {met} ({ghost['ms']:.2f} ms"
      f" vs {theirs['ms']:.2f} ms, {theirs['ms'] / ghost['ms']:.2f}x)"
    )
  return lines


def _print_model(result: dict[str, Any]) -> None:
  print(
    f"\n== {result['model']}: {result['description']}; {result['params']:,} params =="
  )
  print(
    f"per-example gradient norms: median {result['median_example_norm']:.3g},"
    f" {100 * result['fraction_clipped']:.0f}% above the bound {L2_CLIP}"
  )
  if result["ghost_plan"]:
    ways = ", ".join(
      f"{n} {way.removeprefix('ghost: ')}" for way, n in result["ghost_plan"].items()
    )
    print(f"clipjax ghost plan (parameter leaves): {ways}")
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
  for line in _verdicts(result):
    print(line)
  sys.stdout.flush()


def _markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
  lines = [f"Machine: {meta['machine_line']}", ""]
  for result in results:
    lines += [
      f"**{result['model']}**: {result['description']} ({result['params']:,} params)",
      "",
      "| method | ms/step (median) | ratio to its plain step | paired q25-q75 |",
      "|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
      if r["status"] != "ok":
        lines.append(f"| {r['method']} | {r['status']} | | |")
        continue
      ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
      lines.append(
        f"| {r['method']} | {r['ms']:.2f} | {ratio} ({PLAIN[r['framework']]})"
        f" | {_quartiles(r)} |"
      )
    lines += ["", *(f"- {v}" for v in _verdicts(result)), ""]
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

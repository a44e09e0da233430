"""Gradient clipping in a Flax NNX training loop, on two small regressions.

1. The classic example: fit ``sigmoid(w * x + b)`` to ``y = x`` on five points
   with SGD, the gradient value-clipped to ``[-0.1, 0.1]`` by ``clipjax.clip``.
2. A line ``y = 2 x + 1`` seen through noisy targets of which a few percent are
   huge outliers, fitted with minibatch SGD with and without
   ``clipjax.clip_by_global_norm``. A minibatch holding an outlier has a gradient
   a hundred times larger than the others; unclipped, each such step throws the
   line far off, and the outliers pull the least-squares fit up. Clipped, an
   outlier moves the line no more than any other batch, and the fit lands near
   the true line.

The clipper is a link in the optimizer's ``optax.chain``, so the gradient that
``optimizer.update`` applies is the clipped one; the training step reads what
the clipper saw and did from the optimizer state with ``clipjax.clip_stats``.

Run with ``python examples/linear_regression.py [--steps N] [--clip C]``; needs
``pip install 'optax-clipjax[examples]'``.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import clipjax

TRUE_SLOPE = 2.0
TRUE_INTERCEPT = 1.0


class SigmoidLinear(nnx.Module):
  """``sigmoid(Linear(1, 1)(x))``: the classic example's model."""

  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(1, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(self.linear(x))


def make_model(kind: str = "sigmoid", seed: int = 0) -> nnx.Module:
  """Builds the classic example's ``"sigmoid"`` model or a plain ``"linear"`` one."""
  rngs = nnx.Rngs(seed)
  if kind == "sigmoid":
    return SigmoidLinear(rngs)
  if kind == "linear":
    return nnx.Linear(1, 1, rngs=rngs)
  raise ValueError(f"make_model(kind={kind!r}): kind must be 'sigmoid' or 'linear'.")


def classic_data() -> tuple[jax.Array, jax.Array, jax.Array]:
  """The classic example: ``(x_train, y_train, x_test)``, shaped ``(n, 1)``, y = x."""
  x = jnp.array([[0.1], [0.2], [0.3], [0.4], [0.5]], jnp.float32)
  x_test = jnp.array([[0.6], [0.7], [0.8], [0.9], [1.0]], jnp.float32)
  return x, x, x_test


def outlier_data(
  seed: int = 0,
  n: int = 512,
  noise: float = 0.1,
  outlier_fraction: float = 0.05,
  outlier_size: float = 50.0,
) -> tuple[jax.Array, jax.Array]:
  """``y = 2 x + 1 + noise`` on ``x`` in ``[-1, 1]``, some targets replaced by spikes.

  Args:
    seed: seeds numpy's generator; the same seed gives the same data.
    n: the number of points.
    noise: the standard deviation of the Gaussian noise on every target.
    outlier_fraction: the fraction of targets that get a spike added.
    outlier_size: spikes are uniform in ``[outlier_size / 2, outlier_size]``,
      all upwards, as from a sensor that saturates now and then.

  Returns:
    ``(x, y)``, float32 arrays of shape ``(n, 1)``.
  """
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1.0, 1.0, (n, 1))
  y = TRUE_SLOPE * x + TRUE_INTERCEPT + noise * rng.standard_normal((n, 1))
  spiked = rng.random((n, 1)) < outlier_fraction
  y = y + spiked * rng.uniform(outlier_size / 2, outlier_size, (n, 1))
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def mse(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
  """The mean squared error of ``model`` on ``(x, y)``."""
  return jnp.mean((model(x) - y) ** 2)


def clip_scale(opt_state) -> jax.Array:
  """The smallest factor any clipper in ``opt_state`` applied (1 when none did)."""
  is_stats = lambda node: isinstance(node, clipjax.ClipStats)
  nodes = jax.tree.leaves(opt_state, is_leaf=is_stats)
  scales = [
    jnp.min(s) for node in nodes if is_stats(node) for s in jax.tree.leaves(node.scale)
  ]
  return jnp.min(jnp.stack(scales)) if scales else jnp.ones((), jnp.float32)


@nnx.jit
def train_step(model, optimizer, x, y, lr) -> dict[str, jax.Array]:
  """One SGD step; returns what ``train`` records for it.

  The clipped gradient is measured from the update the optimizer applied, which
  for ``optax.sgd(lr)`` is ``-lr`` times it.
  """
  loss, grads = nnx.value_and_grad(mse)(model, x, y)
  updates = optimizer.update(model, grads)
  return {
    "loss": loss,
    "norm_before": clipjax.global_norm(grads),
    "norm_after": clipjax.global_norm(updates) / lr,
    "scale": clip_scale(optimizer.opt_state),
    **clipjax.clip_stats(optimizer.opt_state),
  }


def train(
  model: nnx.Module,
  clipper: optax.GradientTransformation | None,
  x: jax.Array,
  y: jax.Array,
  *,
  steps: int,
  lr: float,
  batch_size: int | None = None,
  seed: int = 0,
) -> dict[str, np.ndarray]:
  """Trains ``model`` in place with ``optax.chain(clipper, optax.sgd(lr))``.

  Args:
    model: the model; its parameters are updated in place.
    clipper: a clipjax transformation, or ``None`` for plain SGD.
    x: inputs, shaped ``(n, 1)``.
    y: targets, shaped ``(n, 1)``.
    steps: the number of SGD steps.
    lr: the learning rate.
    batch_size: the minibatch size (drawn with replacement), or ``None`` for
      the full batch.
    seed: seeds the minibatch draws.

  Returns:
    Per-step arrays: ``loss`` (on the step's batch, before the step),
    ``norm_before`` and ``norm_after`` (the gradient's global L2 norm before
    and after clipping) and ``scale`` (the smallest factor the clipper applied;
    below 1 when clipping fired), and each entry of ``clipjax.clip_stats``
    of the optimizer state, e.g. ``"clip/clipped_fraction/value"`` (NNX keeps
    the state in ``Variable`` boxes, hence the ``/value``).
  """
  tx = optax.sgd(lr) if clipper is None else optax.chain(clipper, optax.sgd(lr))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  n = x.shape[0]
  rng = np.random.default_rng(seed)
  lr_array = jnp.asarray(lr, jnp.float32)
  rows = []
  for _ in range(steps):
    if batch_size is None:
      xb, yb = x, y
    else:
      idx = rng.integers(0, n, batch_size)
      xb, yb = x[idx], y[idx]
    rows.append(train_step(model, optimizer, xb, yb, lr_array))
  rows = jax.device_get(rows)
  keys = rows[0] if rows else ("loss", "norm_before", "norm_after", "scale")
  return {k: np.array([row[k] for row in rows], np.float32) for k in keys}


def line_of(model: nnx.Linear) -> tuple[float, float]:
  """A ``Linear(1, 1)`` model's ``(slope, intercept)``."""
  return float(model.kernel[0, 0]), float(model.bias[0])


def fit_report(model: nnx.Linear) -> dict[str, float]:
  """How far a fitted line is from the true one.

  Returns:
    ``slope``, ``intercept``, ``param_error`` (the Euclidean distance of
    ``(slope, intercept)`` from ``(2, 1)``) and ``clean_mse`` (the mean squared
    error against the noiseless line on 101 points of ``[-1, 1]``).
  """
  slope, intercept = line_of(model)
  x = jnp.linspace(-1.0, 1.0, 101, dtype=jnp.float32)[:, None]
  clean = TRUE_SLOPE * x + TRUE_INTERCEPT
  return {
    "slope": slope,
    "intercept": intercept,
    "param_error": float(np.hypot(slope - TRUE_SLOPE, intercept - TRUE_INTERCEPT)),
    "clean_mse": float(mse(model, x, clean)),
  }


def run_classic(steps: int = 1000, clip: float = 0.1, lr: float = 0.01, seed: int = 0):
  """Case 1; returns ``(model, history)``."""
  x, y, _ = classic_data()
  model = make_model("sigmoid", seed)
  history = train(model, clipjax.clip(clip), x, y, steps=steps, lr=lr)
  return model, history


def run_outliers(
  clip_norm: float | None,
  steps: int = 1000,
  lr: float = 0.05,
  batch_size: int = 8,
  seed: int = 0,
):
  """Case 2, clipped at ``clip_norm`` (``None``: unclipped); ``(model, history)``."""
  x, y = outlier_data(seed)
  model = make_model("linear", seed)
  clipper = None if clip_norm is None else clipjax.clip_by_global_norm(clip_norm)
  history = train(
    model, clipper, x, y, steps=steps, lr=lr, batch_size=batch_size, seed=seed
  )
  return model, history


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=1000, help="SGD steps per run")
  parser.add_argument("--clip", type=float, default=0.1, help="case 1 value bound")
  parser.add_argument("--clip-norm", type=float, default=1.0, help="case 2 bound")
  args = parser.parse_args(argv)

  print(f"Case 1: sigmoid(Linear(x)) on y = x, clipjax.clip({args.clip}), SGD 0.01")
  model, history = run_classic(args.steps, args.clip)
  _, _, x_test = classic_data()
  print(f"  final loss {history['loss'][-1]:.5f};", end=" ")
  print(f"clipping fired on {np.mean(history['scale'] < 1):.0%} of steps")
  for x, p in zip(x_test[:, 0].tolist(), model(x_test)[:, 0].tolist(), strict=True):
    print(f"  x = {x:.1f}: prediction {p:.4f}  (target {x:.1f})")

  print(f"\nCase 2: y = 2 x + 1 with 5% outliers, minibatch SGD, {args.steps} steps")
  print(
    f"  {'clipping':<28} {'slope':>7} {'intercept':>9} {'error':>7} {'clean MSE':>9}"
  )
  for clip_norm in (None, args.clip_norm):
    model, history = run_outliers(clip_norm, args.steps)
    fit = fit_report(model)
    name = "none" if clip_norm is None else f"clip_by_global_norm({clip_norm})"
    print(
      f"  {name:<28} {fit['slope']:7.3f} {fit['intercept']:9.3f}"
      f" {fit['param_error']:7.3f} {fit['clean_mse']:9.4f}"
    )
  print(f"  (true line: slope {TRUE_SLOPE}, intercept {TRUE_INTERCEPT})")


if __name__ == "__main__":
  main()

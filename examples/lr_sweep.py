"""How high can the learning rate go? An MLP on digits, per clipper, over a rate grid.

A 64-128-128-10 ReLU MLP (Flax NNX) classifies scikit-learn's 8x8 ``digits``
(1797 images, shipped with scikit-learn; a fixed stratified split of 1347 for
training and 450 for testing). It is trained with SGD with momentum 0.9 (or
Adam, ``--optimizer adam``) at each learning rate of a log-spaced grid that
runs from rates that train well to rates at which unclipped training fails,
once per clipper. The clipper is a link in the chain before the optimizer,
``optax.chain(clipper, optax.sgd(lr, momentum=0.9))``, except
``skip_and_clip``, which wraps the optimizer (``inner=``) so that a skipped
step leaves the momentum alone, and ``clippy``, which bounds the update and so
comes after it. Runs with the same seed start from the same initial model and
see the same minibatches, whatever the clipper and the rate.

All rates of one clipper train together: the learning rate is an argument of
the training function, ``jax.vmap`` maps it over the grid (the optimizer, and
with it the clipper's state, is built inside the mapped function), and
``jax.lax.scan`` runs the steps, so each clipper costs one compilation and one
call.

With SGD, a clipper that bounds the gradient before momentum widens the range
of rates that train by a factor of about three at most: past that, even the
clipped step is too long. ``clippy``, chained after the optimizer, bounds the
update itself (each coordinate moves at most ``0.1 |w| + 0.01``) and trains at
every rate of the grid. ``spam_clip`` and ``zclip`` without ``max_norm`` clip
relative to the history they have seen, and do not change the range here.

The table gives each clipper's final test accuracy at each rate, averaged over
the seeds, and the largest rate whose accuracy is at least ``--threshold``
(0.9): the largest rate that still trains. It is printed and
written to ``--out``/``table.md``.

Run with ``python examples/lr_sweep.py [--quick] [--optimizer sgd|adam]
[--methods a,b] [--out DIR]``; needs ``pip install 'optax-clipjax[examples]'``.
"""

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clippers import METHODS, add_methods_argument, chosen_methods
from flax import nnx

Tx = optax.GradientTransformation


@dataclasses.dataclass(frozen=True)
class Config:
  """The grid and training settings of one sweep."""

  optimizer: str = "sgd"
  rates: tuple[float, ...] = ()  # empty: the optimizer's default grid
  steps: int = 1000
  batch: int = 64
  hidden: int = 128
  threshold: float = 0.9
  seed: int = 0  # the first seed of the initial models and batch orders
  seeds: int = 3  # trained side by side; the table averages over them


# The default grids: log-spaced, from rates that train to rates that diverge.
GRIDS = {
  "sgd": tuple(float(r) for r in np.logspace(-2, 1.5, 15)),
  "adam": tuple(float(r) for r in np.logspace(-4, 0, 15)),
}
QUICK = {"steps": 200, "seeds": 1}  # and every other rate of the grid


def load_data() -> tuple[np.ndarray, ...]:
  """``(x_train, y_train, x_test, y_test)``: digits scaled to ``[0, 1]``.

  The split (25% test, stratified by class) is fixed: the same on every run.
  """
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  y = y.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
    x, y, test_size=0.25, random_state=0, stratify=y
  )
  return x_train, y_train, x_test, y_test


class MLP(nnx.Module):
  """``64 -> hidden -> hidden -> 10``, ReLU."""

  def __init__(self, hidden: int, rngs: nnx.Rngs):
    self.layers = nnx.List(
      [
        nnx.Linear(64, hidden, rngs=rngs),
        nnx.Linear(hidden, hidden, rngs=rngs),
        nnx.Linear(hidden, 10, rngs=rngs),
      ]
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x)


def make_optimizer(name: str, lr: jax.Array) -> Tx:
  """SGD with momentum 0.9 (``"sgd"``) or Adam (``"adam"``) at ``lr``."""
  return optax.sgd(lr, momentum=0.9) if name == "sgd" else optax.adam(lr)


def make_sweep_fn(
  config: Config,
  wrap: Callable[[Tx], Tx],
  graphdef: nnx.GraphDef,
  data: tuple[np.ndarray, ...],
) -> Callable:
  """A jitted ``(params, rates, batches) -> (accuracy, finite, loss)``.

  ``params`` holds one initial model per seed (stacked on a leading axis),
  ``rates`` is the learning-rate grid and ``batches`` the training-example
  indices of each seed's steps, ``(seeds, steps, batch)``. Each output is
  shaped ``(seeds, rates)``: the test accuracy of the trained model, whether
  its parameters are all finite, and its mean training loss over the last 10%
  of the steps.
  """
  x_train, y_train, x_test, y_test = map(jnp.asarray, data)

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def train_one(params, lr, batches):
    tx = wrap(make_optimizer(config.optimizer, lr))

    def step(carry, idx):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, x_train[idx], y_train[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), batches)
    logits = nnx.merge(graphdef, params)(x_test)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y_test)
    finite = jnp.all(
      jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])
    )
    tail = losses[-max(1, len(losses) // 10) :]
    return accuracy, finite, jnp.mean(tail)

  over_rates = jax.vmap(train_one, in_axes=(None, 0, None))
  return jax.jit(jax.vmap(over_rates, in_axes=(0, None, 0)))


def sweep(config: Config, methods: list[str]) -> dict[str, dict[str, Any]]:
  """Trains every (method, seed, rate); returns per method the results.

  Returns:
    ``{method: {"accuracy", "finite", "loss": arrays shaped (seeds, rates),
    "seconds": the wall time of the method's compilation and training}}``.
  """
  data = load_data()
  seeds = [config.seed + i for i in range(config.seeds)]
  inits = [nnx.split(MLP(config.hidden, nnx.Rngs(s)), nnx.Param) for s in seeds]
  graphdef = inits[0][0]
  params = jax.tree.map(lambda *p: jnp.stack(p), *[p for _, p in inits])
  batches = jnp.asarray(
    np.stack(
      [
        np.random.default_rng(s).integers(0, len(data[0]), (config.steps, config.batch))
        for s in seeds
      ]
    )
  )
  rates = jnp.asarray(config.rates, jnp.float32)
  results = {}
  for name in methods:
    start = time.perf_counter()
    run = make_sweep_fn(config, METHODS[name][1], graphdef, data)
    accuracy, finite, loss = jax.device_get(run(params, rates, batches))
    results[name] = {
      "accuracy": np.asarray(accuracy),
      "finite": np.asarray(finite),
      "loss": np.asarray(loss),
      "seconds": time.perf_counter() - start,
    }
    print(f"{name}: {results[name]['seconds']:.1f} s", flush=True)
  return results


def mean_accuracy(result: dict[str, Any]) -> np.ndarray:
  """Per rate, the test accuracy averaged over seeds; a diverged run counts 0."""
  return np.mean(np.where(result["finite"], result["accuracy"], 0.0), axis=0)


def largest_good_rate(
  rates: np.ndarray, result: dict[str, Any], threshold: float
) -> float | None:
  """The largest rate whose mean accuracy reached ``threshold`` (or None)."""
  good = np.flatnonzero(mean_accuracy(result) >= threshold)
  return float(rates[good[-1]]) if good.size else None


def markdown_table(config: Config, results: dict[str, dict[str, Any]]) -> str:
  """Accuracy per (method, rate), and the largest rate that trains."""
  rates = np.asarray(config.rates)
  head = " | ".join(f"{r:.3g}" for r in rates)
  lines = [
    f"| method | clipper | largest rate with accuracy >= {config.threshold:g}"
    f" | {head} |",
    "|---|---|---:|" + "---:|" * len(rates),
  ]
  for name, result in results.items():
    best = largest_good_rate(rates, result, config.threshold)
    diverged = ~np.any(result["finite"], axis=0)
    cells = [
      "div" if d else f"{a:.3f}"
      for a, d in zip(mean_accuracy(result), diverged, strict=True)
    ]
    lines.append(
      f"| {name} | {METHODS[name][0]} | {'none' if best is None else f'{best:.3g}'}"
      f" | {' | '.join(cells)} |"
    )
  optimizer = (
    "SGD with momentum 0.9" if config.optimizer == "sgd" else "Adam (default betas)"
  )
  lines += [
    "",
    f"Columns are learning rates; cells the test accuracy after {config.steps}"
    f" steps of {optimizer} (batch {config.batch}), averaged over {config.seeds}"
    f" seeds (initial model and batch order; seeds {config.seed} to"
    f" {config.seed + config.seeds - 1}), a run whose parameters ended non-finite"
    " counting 0; div: every seed's did.",
    f"Digits, a fixed split of 1347 train / 450 test; MLP 64-{config.hidden}-"
    f"{config.hidden}-10 (ReLU). The clipper is chained before the optimizer,"
    " except where the clipper column says otherwise.",
  ]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
  parser.add_argument(
    "--rates", type=float, nargs="+", help="the learning rates (default: a grid)"
  )
  parser.add_argument("--steps", type=int, help=f"default {Config.steps}")
  parser.add_argument("--threshold", type=float, default=Config.threshold)
  parser.add_argument("--seed", type=int, default=0, help="the first seed")
  parser.add_argument("--seeds", type=int, help=f"default {Config.seeds}")
  parser.add_argument(
    "--quick", action="store_true", help="fewer steps and seeds (for tests)"
  )
  parser.add_argument("--out", type=Path, default=Path("clipjax-out/lr_sweep"))
  add_methods_argument(parser, METHODS)
  args = parser.parse_args(argv)
  methods = chosen_methods(parser, args.methods)
  overrides: dict[str, Any] = {
    "optimizer": args.optimizer,
    "rates": tuple(args.rates or GRIDS[args.optimizer][:: 2 if args.quick else 1]),
    "threshold": args.threshold,
    "seed": args.seed,
    **(QUICK if args.quick else {}),
  }
  if args.steps is not None:
    overrides["steps"] = args.steps
  if args.seeds is not None:
    overrides["seeds"] = args.seeds
  config = dataclasses.replace(Config(), **overrides)

  start = time.perf_counter()
  results = sweep(config, methods)
  table = markdown_table(config, results)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "table.md").write_text(table)
  print()
  print(table)
  print(f"wrote {args.out / 'table.md'}")
  print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()

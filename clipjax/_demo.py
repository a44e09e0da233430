"""``clipjax demo``: two small Flax NNX regressions, with and without clipping.

Case 1 is the classic example: ``sigmoid(Linear(1, 1))`` fit to ``y = x`` on
five points with SGD, value-clipped by ``clipjax.clip``. Case 2 fits a line to
targets of which a few percent are huge outliers, with minibatch SGD, clipped
by ``clipjax.clip_by_global_norm``. The clipper is a link in the optimizer's
chain, so what is applied is the clipped gradient; what it saw and did is read
back from the optimizer state.

flax, matplotlib and tqdm are optional extras: they are imported when the demo
runs, never when clipjax is imported. ``examples/linear_regression.py`` is the
longer, standalone version of the same two cases.
"""

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clipjax

PLOT_NAME = "clipjax-demo.png"


class MissingExtrasError(ImportError):
  """An optional dependency of the demo is not installed."""


def _import_extras() -> tuple[Any, Any, Any]:
  """``(flax.nnx, matplotlib.figure.Figure, tqdm.tqdm)``, or a clear error."""
  try:
    from flax import nnx
    from matplotlib.figure import Figure
    from tqdm import tqdm
  except ImportError as e:
    raise MissingExtrasError(
      f"the demo needs {e.name or 'flax, matplotlib and tqdm'}, which is not"
      " installed; install the extras with: pip install 'optax-clipjax[examples]'"
    ) from e
  return nnx, Figure, tqdm


def _smallest_scale(opt_state: Any) -> jax.Array:
  """The smallest factor any clipper in ``opt_state`` applied (1 if none)."""
  is_stats = lambda node: isinstance(node, clipjax.ClipStats)
  nodes = [n for n in jax.tree.leaves(opt_state, is_leaf=is_stats) if is_stats(n)]
  scales = [jnp.min(s) for n in nodes for s in jax.tree.leaves(n.scale)]
  return jnp.min(jnp.stack(scales)) if scales else jnp.ones((), jnp.float32)


def _cases(clip: float, clip_norm: float) -> list[dict[str, Any]]:
  """The two problems: data, model, SGD settings, clippers, what to evaluate."""
  x1 = np.arange(1, 6, dtype=np.float32)[:, None] / 10
  rng = np.random.default_rng(0)
  x2 = rng.uniform(-1.0, 1.0, (512, 1))
  y2 = 2 * x2 + 1 + 0.1 * rng.standard_normal((512, 1))
  y2 = y2 + (rng.random((512, 1)) < 0.05) * rng.uniform(25.0, 50.0, (512, 1))
  grid = np.linspace(-1.0, 1.0, 101, dtype=np.float32)[:, None]
  return [
    {
      "title": "case 1: sigmoid(Linear(x)) fit to y = x on x = 0.1..0.5, SGD 0.01",
      "data": (x1, x1),
      "eval": (x1, x1, "loss", "training loss"),
      "sigmoid": True,
      "lr": 0.01,
      "batch": None,
      "runs": {"no clipping": None, f"clip({clip:g})": clipjax.clip(clip)},
    },
    {
      "title": "case 2: y = 2x + 1, 5% of targets +25..50, minibatch 8, SGD 0.05",
      "data": (x2.astype(np.float32), y2.astype(np.float32)),
      "eval": (grid, 2 * grid + 1, "clean MSE", "MSE against the true line"),
      "sigmoid": False,
      "lr": 0.05,
      "batch": 8,
      "runs": {
        "no clipping": None,
        f"clip_by_global_norm({clip_norm:g})": clipjax.clip_by_global_norm(clip_norm),
      },
    },
  ]


def _train(nnx, tqdm, case, clipper, steps, desc, progress) -> tuple[Any, dict]:
  """Trains a fresh model on ``case``; returns it and its per-step history."""
  sigmoid = case["sigmoid"]
  x_eval, y_eval, _, _ = case["eval"]

  class Model(nnx.Module):
    def __init__(self):
      self.linear = nnx.Linear(1, 1, rngs=nnx.Rngs(0))

    def __call__(self, x):
      y = self.linear(x)
      return jax.nn.sigmoid(y) if sigmoid else y

  def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)

  @nnx.jit
  def step(model, optimizer, x, y):
    grads = nnx.grad(loss_fn)(model, x, y)
    updates = optimizer.update(model, grads)  # the clipped gradient, times -lr
    return (
      loss_fn(model, x_eval, y_eval),
      clipjax.global_norm(grads),
      clipjax.global_norm(updates) / case["lr"],
      _smallest_scale(optimizer.opt_state),
    )

  model = Model()
  sgd = optax.sgd(case["lr"])
  tx = sgd if clipper is None else optax.chain(clipper, sgd)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = case["data"]
  rng = np.random.default_rng(0)
  rows = []
  for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
    batch = case["batch"]
    idx = slice(None) if batch is None else rng.integers(0, len(x), batch)
    rows.append(step(model, optimizer, x[idx], y[idx]))
  names = ("loss", "norm_before", "norm_after", "scale")
  columns = zip(*jax.device_get(rows), strict=True)
  return model, {k: np.asarray(v) for k, v in zip(names, columns, strict=True)}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  """Lines of a table: the first column left-aligned, the others right-aligned."""
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  cells = lambda r: (
    c.ljust(w) if i == 0 else c.rjust(w)
    for i, (c, w) in enumerate(zip(r, widths, strict=True))
  )
  return [("  " + "  ".join(cells(r))).rstrip() for r in [header, *rows]]


def _summary(case_index, case, results) -> list[str]:
  """One case's table: final loss, how often clipping fired, the fit."""
  header = ["run", f"final {case['eval'][2]}", "clipped steps"]
  x_test = np.arange(6, 11, dtype=np.float32)[:, None] / 10
  if case_index == 0:
    header += [f"f({v:.1f})" for v in x_test[:, 0]]
  else:
    header += ["slope", "intercept"]
  rows = []
  for name, (model, history) in results.items():
    row = [name, f"{history['loss'][-1]:.4f}", f"{np.mean(history['scale'] < 1):.0%}"]
    if case_index == 0:
      row += [f"{p:.3f}" for p in np.asarray(model(x_test))[:, 0]]
    else:
      row += [f"{model.linear.kernel[0, 0]:.3f}", f"{model.linear.bias[0]:.3f}"]
    rows.append(row)
  if case_index == 0:
    rows.append(["target", "", "", *(f"{v:.3f}" for v in x_test[:, 0])])
  else:
    rows.append(["true line", "", "", "2.000", "1.000"])
  return [case["title"], *_table(header, rows)]


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
  """The running mean over the last ``window`` values (fewer at the start)."""
  sums = np.cumsum(np.concatenate([[0.0], values]))
  counts = np.minimum(np.arange(1, len(values) + 1), window)
  ends = np.arange(1, len(values) + 1)
  return (sums[ends] - sums[ends - counts]) / counts


def _plot(Figure, cases, all_results, path: Path) -> None:
  """The evaluated loss and the gradient norm per step, one row per case."""
  fig = Figure(figsize=(11, 7.5), layout="constrained")
  axes = fig.subplots(len(cases), 2, squeeze=False)
  for (loss_ax, norm_ax), case, results in zip(axes, cases, all_results, strict=True):
    (_, base), (_, clipped) = results.values()
    clip_name = list(results)[1]
    steps = np.arange(1, len(base["loss"]) + 1)
    short = case["title"].split(":")[0]
    # Minibatch norms jump by 10x from step to step: show their running mean.
    window = 1 if case["batch"] is None else 25
    loss_ax.plot(steps, base["loss"], color="0.5", label="no clipping")
    loss_ax.plot(steps, clipped["loss"], color="C0", label=clip_name)
    loss_ax.set(yscale="log", xlabel="step", ylabel=case["eval"][3])
    loss_ax.set_title(f"{short}: {case['eval'][3]}", loc="left")
    norm_ax.plot(
      steps, _smooth(base["norm_before"], window), color="0.5", label="no clipping"
    )
    norm_ax.plot(
      steps,
      _smooth(clipped["norm_before"], window),
      color="C0",
      label=f"{clip_name}: before",
    )
    norm_ax.plot(
      steps, _smooth(clipped["norm_after"], window), color="C1", ls="--", label="after"
    )
    ylabel = "gradient global L2 norm"
    if window > 1:
      ylabel += f", mean of last {window} steps"
    norm_ax.set(yscale="log", xlabel="step", ylabel=ylabel)
    norm_ax.set_title(f"{short}: gradient norm before and after clipping", loc="left")
    for ax in (loss_ax, norm_ax):
      ax.legend(fontsize="small")
      ax.grid(alpha=0.3)
  fig.savefig(path, dpi=110)


def run(
  steps: int = 1000,
  clip: float = 0.1,
  clip_norm: float = 1.0,
  out: str | Path = "clipjax-out",
  progress: bool = True,
  emit: Callable[[str], None] = print,
) -> Path:
  """Runs both cases with and without clipping, prints tables, writes the plot.

  Returns:
    The path of the PNG written under ``out``.

  Raises:
    MissingExtrasError: flax, matplotlib or tqdm is not installed.
  """
  nnx, Figure, tqdm = _import_extras()
  cases = _cases(clip, clip_norm)
  all_results = []
  for i, case in enumerate(cases):
    results = {}
    for name, clipper in case["runs"].items():
      desc = f"case {i + 1}, {name}"
      results[name] = _train(nnx, tqdm, case, clipper, steps, desc, progress)
    all_results.append(results)
    for line in [*_summary(i, case, results), ""]:
      emit(line)
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / PLOT_NAME
  _plot(Figure, cases, all_results, path)
  emit(f"plot: {path}")
  sys.stdout.flush()
  return path

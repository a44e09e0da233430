"""A sweep over clipping bounds in one jitted step: ``jax.vmap`` over the bound.

``clipjax.clip_by_global_norm`` accepts a traced bound, so the optimizer can be
built inside the function that ``jax.vmap`` maps over the bounds: one compiled
step trains N copies of a small MLP, copy ``i`` clipped at ``bounds[i]``. The
data is a sine curve whose targets are sometimes hit by large upward spikes;
every copy sees the same minibatches, so the bound is the only difference.

Run with ``python examples/clip_sweep.py [--steps N] [--bounds 0.1 1 10]``.
"""

import argparse
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clipjax

Params = dict[str, jax.Array]


def make_data(seed: int = 0, n: int = 256) -> tuple[np.ndarray, ...]:
  """``(x, y, x_test, y_test)``: ``y = sin(3x)`` plus noise and 5% spikes of ~20.

  The test targets are the noiseless curve on a grid, so the test loss says how
  well each copy learned the curve under the spikes.
  """
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1.0, 1.0, (n, 1)).astype(np.float32)
  y = np.sin(3 * x) + 0.05 * rng.standard_normal((n, 1))
  y = y + (rng.random((n, 1)) < 0.05) * rng.uniform(10.0, 30.0, (n, 1))
  x_test = np.linspace(-1.0, 1.0, 101, dtype=np.float32)[:, None]
  return x, y.astype(np.float32), x_test, np.sin(3 * x_test)


def init_params(key: jax.Array, hidden: int = 16) -> Params:
  """A 1 -> ``hidden`` -> 1 tanh MLP."""
  k1, k2 = jax.random.split(key)
  return {
    "w1": jax.random.normal(k1, (1, hidden), jnp.float32),
    "b1": jnp.zeros((hidden,), jnp.float32),
    "w2": jax.random.normal(k2, (hidden, 1), jnp.float32) / np.sqrt(hidden),
    "b2": jnp.zeros((1,), jnp.float32),
  }


def loss_fn(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error of the MLP on ``(x, y)``."""
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def make_tx(bound: jax.Array, lr: float) -> optax.GradientTransformation:
  """Global-norm clipping at ``bound`` (may be traced), then SGD."""
  return optax.chain(clipjax.clip_by_global_norm(bound), optax.sgd(lr))


def make_step(lr: float) -> Callable:
  """The un-jitted step ``(params, opt_state, bound, x, y) -> (params, opt_state)``."""

  def step(params, opt_state, bound, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = make_tx(bound, lr).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def _batches(n: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, n, (steps, batch_size))


def sweep(
  bounds: Sequence[float],
  steps: int = 500,
  lr: float = 0.1,
  batch_size: int = 16,
  seed: int = 0,
  vmap: bool = True,
) -> np.ndarray:
  """Trains one model per bound; returns each one's final test loss.

  Args:
    bounds: the clipping bounds, one copy of the model each.
    steps: SGD steps.
    lr: the learning rate.
    batch_size: the minibatch size; all copies see the same minibatches.
    seed: seeds the data, the (shared) initial parameters and the minibatches.
    vmap: if True, one ``jax.jit(jax.vmap(step))`` trains all copies together;
      if False, each bound is trained alone with ``jax.jit(step)``, for checking
      that the sweep equals separate runs.

  Returns:
    A float32 array of shape ``(len(bounds),)``: the MSE of each copy on the
    noiseless test curve after training.
  """
  x, y, x_test, y_test = make_data(seed)
  params = init_params(jax.random.key(seed))
  bounds_array = jnp.asarray(bounds, jnp.float32)
  step = make_step(lr)
  init = lambda bound: make_tx(bound, lr).init(params)
  batches = _batches(len(x), steps, batch_size, seed)
  if vmap:
    n = len(bounds)
    ps = jax.tree.map(lambda p: jnp.broadcast_to(p, (n, *p.shape)), params)
    states = jax.vmap(init)(bounds_array)
    vstep = jax.jit(jax.vmap(step, in_axes=(0, 0, 0, None, None)))
    for idx in batches:
      ps, states = vstep(ps, states, bounds_array, x[idx], y[idx])
    losses = jax.vmap(loss_fn, in_axes=(0, None, None))(ps, x_test, y_test)
    return np.asarray(losses)
  jstep = jax.jit(step)
  losses = []
  for bound in bounds_array:
    p, state = params, init(bound)
    for idx in batches:
      p, state = jstep(p, state, bound, x[idx], y[idx])
    losses.append(loss_fn(p, x_test, y_test))
  return np.asarray(jnp.stack(losses))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument(
    "--bounds", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0, 10.0, 100.0]
  )
  args = parser.parse_args(argv)
  losses = sweep(args.bounds, args.steps)
  print(f"{'bound':>8}  final test loss")
  for bound, loss in zip(args.bounds, losses.tolist(), strict=True):
    print(f"{bound:8g}  {loss:.5f}")


if __name__ == "__main__":
  main()

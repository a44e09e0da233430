"""Loss spikes in a small character-level transformer, with and without clipping.

A two-block pre-LayerNorm transformer (Flax NNX) learns to predict the next byte
of Python source code: the first ``max_chars`` bytes of the standard library's
top-level ``.py`` files (those beside ``os.py``, in sorted order), which ship
with every Python, so nothing is downloaded (the text, and so the numbers,
change a little from one Python version to another). The first 90% is the
training text, the rest the validation text. The optimizer is SGD with momentum
0.9, without warm-up, at a learning rate high enough that unclipped training
blows up. Every method trains the same initial model on the same batches, so
the clipper is the only difference. The clipper is a link in the chain before
the optimizer, ``optax.chain(clipper, optax.sgd(lr, momentum=0.9))``, except
``skip_and_clip``, which wraps the optimizer (``inner=``) so that a skipped
step leaves the momentum alone.

A *spike* is a step whose training loss (the loss of that step's batch, before
the step) is more than ``SPIKE_FACTOR`` (1.5) times the median of the previous
``SPIKE_WINDOW`` (50) steps' losses; the first ``SPIKE_MIN_HISTORY`` (10) steps
are never spikes, and steps 10 to 49 compare with the median of all the steps
before them. A step whose loss is not finite is not counted as a spike: the run
has diverged, and the table says at which step.

Per method the script records each step's training loss and gradient norm, the
steps on which the clipper scaled the gradient down and those on which it
dropped the update altogether (both read from the optimizer state with
``clipjax.clip_stats``), and the mean validation loss of the final model over
fixed validation batches. It writes ``loss.png``, ``table.md`` and the per-step
records (``history.npz``) to ``--out``, and prints the table.

What to expect with the defaults: unclipped, the loss spikes within the first
steps and the run diverges within a hundred. A fixed bound keeps it stable.
The adaptive clippers learn their bound from the norms they have seen, so what
they do in the first steps, before they have a history, decides the run here:
``zclip`` lets its 25 warm-up steps through unclipped unless given a
``max_norm`` (hence the ``zclip_capped`` row), ``autoclip`` never clips its
first step, ``adagc`` clips to a fixed global bound during its warm-up.
``--methods`` also takes ``quantile_clip``, ``spam_clip`` and ``clippy`` (which
bounds the update, so it comes after the optimizer).

Each method's training is one ``jax.jit``-compiled ``jax.lax.scan`` over
chunks of ``Config.chunk`` steps, built once per method. On a 2-core CPU, 300
steps of the default model took 11 s this way (compilation included) against
16 s with an ``nnx.jit`` step per Python iteration, with the same losses.

Run with ``python examples/spikes.py [--steps N] [--lr LR] [--methods a,b]
[--quick] [--out DIR]``; needs ``pip install 'optax-clipjax[examples]'``.
"""

import argparse
import dataclasses
import glob
import os
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

import clipjax

Tx = optax.GradientTransformation

SPIKE_FACTOR = 1.5
SPIKE_WINDOW = 50
SPIKE_MIN_HISTORY = 10
FINAL_WINDOW = 50  # the final training loss is the mean over this many steps
RECORDED = ("loss", "grad_norm", "clipped", "skipped")  # per step, per method


@dataclasses.dataclass(frozen=True)
class Config:
  """The model, data and training settings of one comparison."""

  d_model: int = 64
  heads: int = 4
  layers: int = 2
  context: int = 64
  batch: int = 32
  steps: int = 1000
  lr: float = 0.5
  max_chars: int = 1_000_000
  val_batches: int = 16
  chunk: int = 100  # steps per compiled scan
  seed: int = 0


QUICK = Config(
  d_model=16,
  heads=2,
  layers=1,
  context=16,
  steps=100,
  chunk=50,
  max_chars=50_000,
  val_batches=2,
)


DEFAULT_METHODS = (
  "none",
  "clip_by_global_norm",
  "adaptive_grad_clip",
  "autoclip",
  "zclip",
  "zclip_capped",
  "adagc",
  "skip_and_clip",
)


# ---------------------------------------------------------------------------
# Data


def load_text(max_chars: int) -> tuple[np.ndarray, np.ndarray, int]:
  """The standard library's top-level sources as token ids.

  Args:
    max_chars: how many bytes of the concatenated files to keep.

  Returns:
    ``(train, val, vocab_size)``: int32 token ids of the first 90% and of the
    rest, and the number of distinct bytes (the ids are the ranks of the bytes
    that occur, so the vocabulary has no unused entries).
  """
  root = os.path.dirname(os.__file__)
  text = bytearray()
  for path in sorted(glob.glob(os.path.join(root, "*.py"))):
    with open(path, "rb") as f:
      text += f.read()
    if len(text) >= max_chars:
      break
  data = np.frombuffer(bytes(text[:max_chars]), np.uint8)
  present = np.unique(data)
  ids = np.zeros(256, np.int32)
  ids[present] = np.arange(len(present), dtype=np.int32)
  tokens = ids[data]
  split = int(0.9 * len(tokens))
  return tokens[:split], tokens[split:], len(present)


def windows(tokens: np.ndarray, starts: np.ndarray, context: int) -> np.ndarray:
  """The ``context + 1`` tokens from each of ``starts`` (any shape), on a new axis.

  The model reads ``[..., :-1]`` and predicts ``[..., 1:]``.
  """
  return tokens[starts[..., None] + np.arange(context + 1)]


# ---------------------------------------------------------------------------
# Model


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

  def __init__(self, d_model: int, heads: int, rngs: nnx.Rngs):
    self.attn_norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      num_heads=heads, in_features=d_model, decode=False, rngs=rngs
    )
    self.mlp_norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.up = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
    self.down = nnx.Linear(4 * d_model, d_model, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), mask=mask)
    return x + self.down(jax.nn.gelu(self.up(self.mlp_norm(x))))


class CharTransformer(nnx.Module):
  """Token and position embeddings, ``layers`` blocks, a final norm, a linear head."""

  def __init__(self, vocab: int, config: Config, rngs: nnx.Rngs):
    d = config.d_model
    self.tokens = nnx.Embed(vocab, d, rngs=rngs)
    self.positions = nnx.Embed(config.context, d, rngs=rngs)
    self.blocks = nnx.List([Block(d, config.heads, rngs) for _ in range(config.layers)])
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """Next-token logits, shaped ``(..., length, vocab)``."""
    x = self.tokens(ids) + self.positions(jnp.arange(ids.shape[-1]))
    mask = nnx.make_causal_mask(ids)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.norm(x))


def make_loss_fn(graphdef: nnx.GraphDef) -> Callable:
  """``loss(params, seqs)``: the mean next-token cross entropy on ``seqs``."""

  def loss_fn(params: nnx.State, seqs: jax.Array) -> jax.Array:
    logits = nnx.merge(graphdef, params)(seqs[..., :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, seqs[..., 1:]).mean()

  return loss_fn


# ---------------------------------------------------------------------------
# Training


def _nonfinite_count(stats: dict[str, jax.Array]) -> jax.Array:
  counts = [v for k, v in stats.items() if k.endswith("/nonfinite_steps")]
  return sum(counts, start=jnp.zeros((), jnp.int32))


def step_flags(old_state: Any, new_state: Any) -> tuple[jax.Array, jax.Array]:
  """``(clipped, skipped)``: what the clippers did on one update.

  Read from ``clipjax.clip_stats`` of the optimizer state before and after the
  update. Skipped: the update was dropped, because ``skip_and_clip`` skipped
  it (its ``skipped``) or a clipper zeroed a non-finite gradient (its
  ``nonfinite_steps`` went up). Clipped: not skipped, and some clipper scaled
  some block of the gradient down. Both are False when the chain has no
  clipper.
  """
  stats = clipjax.clip_stats(new_state)
  false = jnp.zeros((), bool)
  fractions = [v for k, v in stats.items() if k.endswith("/clipped_fraction")]
  if not fractions:
    return false, false
  dropped = [v > 0 for k, v in stats.items() if k.endswith("/skipped")]
  old_stats = clipjax.clip_stats(old_state)
  dropped.append(_nonfinite_count(stats) > _nonfinite_count(old_stats))
  skipped = jnp.any(jnp.stack(dropped))
  clipped = jnp.max(jnp.stack(fractions)) > 0
  return clipped & ~skipped, skipped


def make_chunk_fn(loss_fn: Callable, tx: optax.GradientTransformation) -> Callable:
  """A jitted ``(params, opt_state, seqs) -> ((params, opt_state), records)``.

  ``seqs`` is shaped ``(steps, batch, context + 1)``; one ``lax.scan`` runs the
  steps. ``records`` holds each step's ``loss``, ``grad_norm`` (before
  clipping), ``clipped`` and ``skipped``.
  """

  def step(carry, seqs):
    params, old_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, seqs)
    updates, opt_state = tx.update(grads, old_state, params)
    params = optax.apply_updates(params, updates)
    clipped, skipped = step_flags(old_state, opt_state)
    record = {
      "loss": loss,
      "grad_norm": clipjax.global_norm(grads),
      "clipped": clipped,
      "skipped": skipped,
    }
    return (params, opt_state), record

  return jax.jit(
    lambda params, opt_state, seqs: jax.lax.scan(step, (params, opt_state), seqs)
  )


def count_spikes(losses: np.ndarray) -> tuple[int, np.ndarray]:
  """Counts the spikes in a loss curve (see the module docstring).

  Returns:
    ``(count, steps)``: the number of spikes and the indices of the spiking
    steps.
  """
  spikes = []
  for t in range(SPIKE_MIN_HISTORY, len(losses)):
    if not np.isfinite(losses[t]):
      continue
    history = losses[max(0, t - SPIKE_WINDOW) : t]
    history = history[np.isfinite(history)]
    if history.size and losses[t] > SPIKE_FACTOR * np.median(history):
      spikes.append(t)
  return len(spikes), np.asarray(spikes, np.int64)


def train_method(
  wrap: Callable[[Tx], Tx],
  config: Config,
  model: CharTransformer,
  batches: np.ndarray,
  val_seqs: np.ndarray,
) -> dict[str, Any]:
  """Trains a copy of ``model`` on ``batches`` and evaluates it on ``val_seqs``.

  Args:
    wrap: builds the whole transformation from the optimizer (a ``METHODS``
      entry).
    config: the settings (``lr``, ``chunk``).
    model: the initial model, left unchanged.
    batches: token windows shaped ``(steps, batch, context + 1)``.
    val_seqs: validation windows shaped ``(val_batches, batch, context + 1)``.

  Returns:
    Per-step ``loss``, ``grad_norm``, ``clipped`` and ``skipped`` arrays, the
    ``val_loss`` of the final model and the ``seconds`` the training took
    (compilation included).
  """
  start = time.perf_counter()
  graphdef, params = nnx.split(model, nnx.Param)
  loss_fn = make_loss_fn(graphdef)
  tx = wrap(optax.sgd(config.lr, momentum=0.9))
  opt_state = tx.init(params)
  run_chunk = make_chunk_fn(loss_fn, tx)
  records = []
  for first in range(0, len(batches), config.chunk):
    (params, opt_state), record = run_chunk(
      params, opt_state, batches[first : first + config.chunk]
    )
    records.append(record)
  history = {k: np.concatenate([r[k] for r in records]) for k in records[0]}
  val_loss = jax.jit(jax.vmap(loss_fn, in_axes=(None, 0)))(params, val_seqs)
  history["val_loss"] = float(jnp.mean(val_loss))
  history["seconds"] = time.perf_counter() - start
  return history


# ---------------------------------------------------------------------------
# Report


def summarize(name: str, history: dict[str, Any]) -> dict[str, Any]:
  """One table row: spikes, divergence, final losses, clipped and skipped steps."""
  losses = history["loss"]
  n_spikes, spike_steps = count_spikes(losses)
  bad = np.flatnonzero(~np.isfinite(losses))
  last = losses[-FINAL_WINDOW:]
  return {
    "method": name,
    "label": METHODS[name][0],
    "spikes": n_spikes,
    "spike_steps": spike_steps,
    "diverged_at": int(bad[0]) if bad.size else None,
    "final_train_loss": float(np.mean(last)),
    "val_loss": history["val_loss"],
    "clipped": int(np.sum(history["clipped"])),
    "skipped": int(np.sum(history["skipped"])),
    "seconds": history["seconds"],
  }


def markdown_table(rows: list[dict[str, Any]], config: Config) -> str:
  """The comparison as a markdown table, with the definitions under it."""
  lines = [
    "| method | clipper | spikes | diverged at step | final train loss"
    " | final val loss | steps clipped | steps skipped | seconds |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    diverged = "-" if r["diverged_at"] is None else str(r["diverged_at"])
    lines.append(
      f"| {r['method']} | {r['label']} | {r['spikes']} | {diverged}"
      f" | {r['final_train_loss']:.3f} | {r['val_loss']:.3f}"
      f" | {r['clipped']} | {r['skipped']} | {r['seconds']:.1f} |"
    )
  steps = config.steps
  lines += [
    "",
    f"{steps} steps of SGD (momentum 0.9, learning rate {config.lr:g}), batch"
    f" {config.batch} x {config.context} bytes, d_model {config.d_model},"
    f" {config.layers} blocks, seed {config.seed}; all methods start from the same"
    " model and see the same batches.",
    f"Spike: a step (from step {SPIKE_MIN_HISTORY} on) whose training loss is"
    f" above {SPIKE_FACTOR:g}x the median of the previous {SPIKE_WINDOW} steps'"
    " losses; non-finite losses are not spikes but divergence (first such step"
    " shown).",
    f"Final train loss: the mean over the last {FINAL_WINDOW} steps; final val"
    f" loss: the mean over {config.val_batches} fixed validation batches (nats"
    " per byte).",
    "Steps clipped: updates some clipper scaled down (for a per-block clipper: at"
    " least one block); steps skipped: updates dropped, by skip_and_clip or as"
    " non-finite; both from clipjax.clip_stats.",
  ]
  return "\n".join(lines) + "\n"


def plot(histories: dict[str, dict[str, Any]], rows, path: Path) -> None:
  """Training loss and gradient norm per step, one line per method.

  The loss axis stops at 4x the first step's loss and the norm axis at 1000,
  so that a blow-up does not flatten the curves that matter; the legend says
  which runs diverged or ended above the chart.
  """
  from matplotlib.figure import Figure
  from matplotlib.ticker import FormatStrFormatter

  first = histories[rows[0]["method"]]["loss"][0]
  top = 4 * float(first) if np.isfinite(first) else None
  fig = Figure(figsize=(11, 8), layout="constrained")
  loss_ax, norm_ax = fig.subplots(2, 1, sharex=True)
  lowest = np.inf
  for row in rows:
    history = histories[row["method"]]
    losses = history["loss"]
    steps = np.arange(len(losses))
    label = row["label"]
    if row["diverged_at"] is not None:
      label += f" (diverged at step {row['diverged_at']})"
    elif top is not None and row["final_train_loss"] > top:
      label += f" (ends at {row['final_train_loss']:.3g}, above the chart)"
    (line,) = loss_ax.plot(steps, losses, lw=0.8, label=label)
    if row["spikes"]:
      at = row["spike_steps"]
      loss_ax.plot(at, losses[at], "x", color=line.get_color(), ms=5)
    norm_ax.plot(steps, history["grad_norm"], lw=0.8, color=line.get_color())
    lowest = min(lowest, losses[np.isfinite(losses)].min(initial=np.inf))
  loss_ax.set(yscale="log", ylabel="training loss (nats per byte)")
  if top is not None and np.isfinite(lowest):
    loss_ax.set_ylim(0.9 * lowest, top)
  loss_ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
  loss_ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
  loss_ax.set_title(
    f"per-step training loss; x = spike (> {SPIKE_FACTOR:g}x the running median"
    f" of the previous {SPIKE_WINDOW} steps)"
  )
  loss_ax.legend(fontsize="small")
  norm_ax.set(yscale="log", xlabel="step", ylabel="gradient norm before clipping")
  norm_ax.set_ylim(top=1e3)
  fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------
# Main


def run(config: Config, methods: list[str], out: Path) -> str:
  """Trains every method, writes ``loss.png`` and ``table.md``; returns the table."""
  train, val, vocab = load_text(config.max_chars)
  rng = np.random.default_rng(config.seed)
  high = len(train) - config.context - 1
  batches = windows(
    train, rng.integers(0, high, (config.steps, config.batch)), config.context
  )
  val_starts = np.random.default_rng(config.seed + 1).integers(
    0, len(val) - config.context - 1, (config.val_batches, config.batch)
  )
  val_seqs = windows(val, val_starts, config.context)
  model = CharTransformer(vocab, config, nnx.Rngs(config.seed))

  histories, rows = {}, []
  for name in methods:
    history = train_method(METHODS[name][1], config, model, batches, val_seqs)
    histories[name] = history
    rows.append(summarize(name, history))
    print(
      f"{name}: {rows[-1]['spikes']} spikes, val loss {rows[-1]['val_loss']:.3f}"
      f" ({history['seconds']:.1f} s)",
      flush=True,
    )

  out.mkdir(parents=True, exist_ok=True)
  table = markdown_table(rows, config)
  (out / "table.md").write_text(table)
  plot(histories, rows, out / "loss.png")
  np.savez(
    out / "history.npz",
    **{f"{k}/{name}": h[k] for name, h in histories.items() for k in RECORDED},
  )
  return table


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, help=f"default {Config.steps}")
  parser.add_argument("--lr", type=float, help=f"default {Config.lr}")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--quick", action="store_true", help="a smaller model, fewer steps (for tests)"
  )
  parser.add_argument("--out", type=Path, default=Path("clipjax-out/spikes"))
  add_methods_argument(parser, DEFAULT_METHODS)
  args = parser.parse_args(argv)
  methods = chosen_methods(parser, args.methods)
  config = QUICK if args.quick else Config()
  overrides = {"seed": args.seed}
  if args.steps is not None:
    overrides["steps"] = args.steps
  if args.lr is not None:
    overrides["lr"] = args.lr
  config = dataclasses.replace(config, **overrides)

  start = time.perf_counter()
  table = run(config, methods, args.out)
  print()
  print(table)
  print(f"wrote {args.out / 'table.md'} and {args.out / 'loss.png'}")
  print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()

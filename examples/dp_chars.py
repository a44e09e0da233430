"""DP-SGD on a scanned character-level transformer: ghost norms through nnx.scan.

The model is ``examples/spikes.py``'s pre-LayerNorm transformer, written as JAX
language models are: its blocks stacked with ``nnx.vmap`` (one leading axis of
``layers`` on every block parameter) and applied with ``nnx.scan``. It learns
to predict the next byte of the standard library's Python sources (the first
``max_chars`` bytes of the top-level ``.py`` files, which ship with Python, so
nothing is downloaded; the first 90% for training, the rest for validation).

The unit of privacy is one training window of ``context + 1`` bytes: a fixed
pool of ``--pool`` windows at random starts in the training text is the
dataset. The model is trained twice from the same initial weights, with the
same SGD (learning rate, momentum) and number of steps:

- without privacy: ``optax.sgd`` on the mean loss of batches of
  ``--batch-size`` windows drawn from the pool, the batch gradient clipped to
  global norm ``--l2-clip`` (``clipjax.clip_by_global_norm``): unclipped, SGD
  at this learning rate spikes and stalls (see ``spikes.py``), which would make
  DP-SGD, whose clipping steadies it, look better than training without
  privacy;
- with DP-SGD: each step's batch is Poisson-sampled from the pool (each window
  independently with probability ``q = batch_size / pool``, padded to one size
  with masked rows), the per-window gradients are clipped to ``--l2-clip`` and
  summed by ``clipjax.per_example_clipped_grad``, whose ghost norms follow
  every block parameter into the scan (``plan()`` prints ``ghost: dense ...
  in scan (L=layers, stacked)``), and ``clipjax.privacy.dp_sgd`` adds the
  noise and takes the step.

The table gives each run's mean validation loss (next-byte cross entropy, in
nats, over fixed validation windows) and, for DP-SGD, the epsilon that
``clipjax.privacy.epsilon``'s RDP accountant gives for ``q``, the steps and
``delta = 1e-5``.

Run with ``python examples/dp_chars.py [--steps 300] [--noise-multiplier 1.0]
[--l2-clip 1.0] [--batch-size 256] [--pool 16384] [--lr 0.5] [--d-model 32]
[--layers 2] [--quick]``;
needs ``pip install 'optax-clipjax[examples]'``.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from dp_digits import poisson_batches
from flax import nnx
from spikes import Block, Config, load_text, windows

import clipjax
from clipjax import privacy

DELTA = 1e-5


class ScannedCharTransformer(nnx.Module):
  """``spikes.CharTransformer`` with its blocks stacked and run by ``nnx.scan``."""

  def __init__(self, vocab: int, config: Config, rngs: nnx.Rngs):
    d = config.d_model
    self.tokens = nnx.Embed(vocab, d, rngs=rngs)
    self.positions = nnx.Embed(config.context, d, rngs=rngs)

    @nnx.split_rngs(splits=config.layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def blocks(rngs: nnx.Rngs) -> Block:
      return Block(d, config.heads, rngs)

    self.blocks = blocks(rngs)
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """Next-token logits, shaped ``(batch, length, vocab)``."""
    x = self.tokens(ids) + self.positions(jnp.arange(ids.shape[-1]))
    mask = nnx.make_causal_mask(ids)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x: jax.Array, block: Block) -> jax.Array:
      return block(x, mask)

    return self.head(self.norm(run(x, self.blocks)))


def per_window_loss(model: nnx.Module, seqs: jax.Array, mask: jax.Array) -> jax.Array:
  """Each window's mean next-byte cross entropy, zero where ``mask`` is 0."""
  logits = model(seqs[:, :-1])
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, seqs[:, 1:])
  return per_token.mean(axis=-1) * mask


def validation_loss(model: nnx.Module, val: np.ndarray) -> float:
  seqs = jnp.asarray(val)
  return float(jnp.mean(per_window_loss(model, seqs, jnp.ones(len(seqs)))))


def train(
  dp: bool,
  data: tuple[np.ndarray, np.ndarray, int],
  config: Config,
  args: argparse.Namespace,
) -> tuple[float, float, dict[str, str]]:
  """One run from the seed's model: (validation loss, seconds, ghost plan)."""
  pool, val, vocab = data
  model = ScannedCharTransformer(vocab, config, nnx.Rngs(config.seed))
  momentum = args.momentum or None
  rng = np.random.default_rng(config.seed + 2)
  if dp:
    tx = privacy.dp_sgd(
      args.lr,
      args.l2_clip,
      args.noise_multiplier,
      jax.random.key(config.seed + 1),
      batch_size=args.batch_size,
      momentum=momentum,
    )
    indices, masks = poisson_batches(
      len(pool), args.batch_size / len(pool), args.steps, rng
    )
  else:
    tx = optax.chain(
      clipjax.clip_by_global_norm(args.l2_clip), optax.sgd(args.lr, momentum=momentum)
    )
    indices = rng.integers(0, len(pool), (args.steps, args.batch_size))
    masks = np.ones(indices.shape, np.float32)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  clipped_grad = clipjax.per_example_clipped_grad(per_window_loss, l2_clip=args.l2_clip)
  plan = clipped_grad.plan(model, jnp.asarray(pool[indices[0]]), jnp.asarray(masks[0]))

  @nnx.jit
  def step(model, optimizer, seqs, mask):
    if dp:
      grads, _ = clipped_grad(model, seqs, mask)
    else:
      grads = nnx.grad(lambda m: jnp.mean(per_window_loss(m, seqs, mask)))(model)
    optimizer.update(model, grads)

  start = time.perf_counter()
  for idx, m in zip(indices, masks, strict=True):
    step(model, optimizer, jnp.asarray(pool[idx]), jnp.asarray(m))
  seconds = time.perf_counter() - start
  return validation_loss(model, val), seconds, plan


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--noise-multiplier", type=float, default=1.0)
  parser.add_argument("--l2-clip", type=float, default=1.0)
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--pool", type=int, default=16384, help="training windows")
  parser.add_argument("--lr", type=float, default=0.5)
  parser.add_argument("--momentum", type=float, default=0.9)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--d-model", type=int, default=32)
  parser.add_argument(
    "--quick", action="store_true", help="a tiny model and 20 steps, for tests"
  )
  args = parser.parse_args(argv)
  config = Config(d_model=args.d_model, heads=4, layers=args.layers, max_chars=300_000)
  if args.quick:
    config = Config(d_model=16, heads=2, layers=2, context=16, max_chars=50_000)
    args.steps, args.pool, args.batch_size = 20, 2048, 64
  train_tokens, val_tokens, vocab = load_text(config.max_chars)
  rng = np.random.default_rng(config.seed)
  starts = rng.integers(0, len(train_tokens) - config.context - 1, args.pool)
  val_starts = rng.integers(0, len(val_tokens) - config.context - 1, 256)
  data = (
    windows(train_tokens, starts, config.context),
    windows(val_tokens, val_starts, config.context),
    vocab,
  )
  q = args.batch_size / args.pool
  eps = privacy.epsilon(args.noise_multiplier, q, args.steps, DELTA)
  plain_loss, plain_s, _ = train(False, data, config, args)
  dp_loss, dp_s, plan = train(True, data, config, args)
  scanned = sorted({v for k, v in plan.items() if k.startswith("['blocks']")})
  print(
    f"chars: {args.pool} training windows of {config.context + 1} bytes, vocab"
    f" {vocab}; {config.layers} scanned blocks of d={config.d_model}; SGD at lr"
    f" {args.lr:g}, momentum {args.momentum:g}, batch {args.batch_size} (DP:"
    f" Poisson-sampled, q = {q:.4f}), {args.steps} steps"
  )
  print(f"ghost plan of the block parameters: {'; '.join(scanned)}")
  print()
  print("| training | validation loss (nats) | epsilon (delta=1e-5) | seconds |")
  print("|---|---:|---:|---:|")
  print(
    f"| non-private SGD (global norm {args.l2_clip:g}) | {plain_loss:.3f} | inf"
    f" | {plain_s:.1f} |"
  )
  print(
    f"| DP-SGD (z={args.noise_multiplier:g}, C={args.l2_clip:g}) | {dp_loss:.3f}"
    f" | {eps:.2f} | {dp_s:.1f} |"
  )


if __name__ == "__main__":
  main()

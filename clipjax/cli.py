"""The ``clipjax`` command line: ``clipjax demo`` and ``clipjax bench``."""

import argparse
from collections.abc import Sequence

from clipjax import __version__


def _steps(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
  return value


def _bound(text: str) -> float:
  value = float(text)
  if not 0 <= value < float("inf"):
    raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
  return value


def build_parser() -> argparse.ArgumentParser:
  """The parser for ``clipjax [command] [options]``."""
  parser = argparse.ArgumentParser(
    prog="clipjax",
    description="Gradient clipping as composable optax transformations.",
  )
  parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
  commands = parser.add_subparsers(dest="command", required=True, metavar="command")
  demo = commands.add_parser(
    "demo",
    help="train two small regressions with and without clipping, plot them",
    description=(
      "Trains sigmoid(Linear(x)) on y = x (value clipping, clipjax.clip) and"
      " a line on data with outliers (clipjax.clip_by_global_norm), each"
      " with and without clipping; prints a summary and writes a PNG of the"
      " loss and the gradient norm before and after clipping."
      " Needs: pip install 'optax-clipjax[examples]'."
    ),
  )
  demo.add_argument("--steps", type=_steps, default=1000, help="SGD steps per run")
  demo.add_argument(
    "--clip", type=_bound, default=0.1, help="case 1: clipjax.clip bound (0.1)"
  )
  demo.add_argument(
    "--clip-norm",
    type=_bound,
    default=1.0,
    help="case 2: clipjax.clip_by_global_norm bound (1.0)",
  )
  demo.add_argument(
    "--out", default="clipjax-out", help="directory for the PNG (clipjax-out)"
  )
  demo.add_argument(
    "--no-progress",
    dest="progress",
    action="store_false",
    help="hide the progress bars",
  )
  bench = commands.add_parser(
    "bench",
    help="run the benchmarks and print one table of ratios",
    description=(
      "Runs benchmarks/ (each script in its own process): clipjax against optax,"
      " the plain step of each framework (with jax_privacy and Opacus where"
      " installed), exact lax.top_k and a memory pass, as ratios measured side"
      " by side; prints one table and writes it as bench.md and bench.json."
      " The quick default takes a few minutes on 2 CPU cores."
    ),
  )
  bench.add_argument(
    "--full", action="store_true", help="the issues' sizes and repetitions (slow)"
  )
  bench.add_argument(
    "--out", default="clipjax-out", help="directory for bench.md and bench.json"
  )
  bench.add_argument(
    "--only",
    nargs="+",
    metavar="NAME",
    help="a subset: clip_overhead adaptive_overhead compressors per_example",
  )
  bench.add_argument(
    "--benchmarks", default=None, help="the benchmarks folder (default: the repo's)"
  )
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs ``clipjax`` with ``argv`` (default: ``sys.argv[1:]``); returns 0.

  Exits with status 2 on bad arguments, and 1 when the demo's optional
  dependencies are missing or a benchmark fails.
  """
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command == "demo":
    from clipjax import _demo

    try:
      _demo.run(
        steps=args.steps,
        clip=args.clip,
        clip_norm=args.clip_norm,
        out=args.out,
        progress=args.progress,
      )
    except _demo.MissingExtrasError as e:
      parser.exit(1, f"clipjax demo: {e}\n")
  elif args.command == "bench":
    from clipjax import _bench

    try:
      _bench.run(
        full=args.full, out=args.out, benchmarks=args.benchmarks, only=args.only
      )
    except _bench.BenchError as e:
      parser.exit(1, f"{e}\n")
  return 0

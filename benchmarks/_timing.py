"""Interleaved A/B timing shared by the benchmarks (run from this folder's scripts)."""

import statistics
from collections.abc import Callable


def interleaved(
  run_a: Callable[[int], float],
  run_b: Callable[[int], float],
  reps: int,
  warmup: int,
) -> tuple[list[float], list[float]]:
  """Seconds per call of A and B, in ABBA order so neither always goes first.

  ``run_a(i)`` runs repetition ``i`` of A and returns the seconds it took.
  """
  for i in range(warmup):
    run_a(i)
    run_b(i)
  times_a, times_b = [], []
  for i in range(reps):
    if i % 2 == 0:
      times_a.append(run_a(i))
      times_b.append(run_b(i))
    else:
      times_b.append(run_b(i))
      times_a.append(run_a(i))
  return times_a, times_b


def paired_quartiles(times_a: list[float], times_b: list[float]) -> tuple[float, float]:
  """Quartiles of the back-to-back ratios ``a / b``: how far to trust a ratio.

  Each A/B pair ran back to back, so its ratio is immune to slow drift.
  """
  pairs = sorted(a / b for a, b in zip(times_a, times_b, strict=True))
  if len(pairs) < 2:
    return pairs[0], pairs[0]
  q25, _, q75 = statistics.quantiles(pairs, n=4)
  return q25, q75

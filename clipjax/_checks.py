"""Construction-time checks of hyperparameters that name the call and the value."""

from typing import Any

import jax
import numpy as np


def is_concrete(value: Any) -> bool:
  """True if ``value`` can be inspected in Python (not a tracer)."""
  return not isinstance(value, jax.core.Tracer)


def check_bound(
  call: str,
  name: str,
  value: Any,
  *,
  allow_inf: bool = False,
  positive: bool = False,
) -> None:
  """Raises ``ValueError`` unless a concrete ``value`` is a valid bound.

  Valid means: not NaN, not negative (not zero either if ``positive``), and
  finite unless ``allow_inf``. Traced values are left alone: they are never
  inspected with Python ``if``.
  """
  if not is_concrete(value):
    return
  try:
    arr = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{call}({name}={value!r}) must be a number.") from e
  bad = (
    np.isnan(arr)
    | (arr <= 0 if positive else arr < 0)
    | (np.isinf(arr) if not allow_inf else np.zeros_like(arr, dtype=bool))
  )
  if np.any(bad):
    kind = "positive" if positive else "non-negative"
    finite = "" if allow_inf else " finite"
    raise ValueError(f"{call}({name}={value!r}) must be a{finite} {kind} number.")

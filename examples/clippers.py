"""The clippers the adaptive-clipping examples compare, by name.

Shared by ``spikes.py`` and ``lr_sweep.py`` (run them from the repository root
or from this folder; Python puts this folder on the path).
"""

import argparse
from collections.abc import Callable, Sequence

import optax

import clipjax

Tx = optax.GradientTransformation

# name -> (the clipper as the table shows it, how it wraps the optimizer).
METHODS: dict[str, tuple[str, Callable[[Tx], Tx]]] = {
  "none": ("no clipping", lambda opt: opt),
  "clip_by_global_norm": (
    "clip_by_global_norm(1.0)",
    lambda opt: optax.chain(clipjax.clip_by_global_norm(1.0), opt),
  ),
  "adaptive_grad_clip": (
    "adaptive_grad_clip(0.01)",
    lambda opt: optax.chain(clipjax.adaptive_grad_clip(0.01), opt),
  ),
  "autoclip": ("autoclip(10.0)", lambda opt: optax.chain(clipjax.autoclip(10.0), opt)),
  "zclip": ("zclip()", lambda opt: optax.chain(clipjax.zclip(), opt)),
  "zclip_capped": (
    "zclip(max_norm=1.0)",
    lambda opt: optax.chain(clipjax.zclip(max_norm=1.0), opt),
  ),
  "adagc": ("adagc()", lambda opt: optax.chain(clipjax.adagc(), opt)),
  "skip_and_clip": (
    "skip_and_clip(1.0, 10.0, inner=opt)",
    lambda opt: clipjax.skip_and_clip(1.0, 10.0, inner=opt),
  ),
  "quantile_clip": (
    "quantile_clip()",
    lambda opt: optax.chain(clipjax.quantile_clip(), opt),
  ),
  "spam_clip": ("spam_clip()", lambda opt: optax.chain(clipjax.spam_clip(), opt)),
  # After the optimizer: clippy bounds the update, not the gradient. Its default
  # absolute=1e-7 all but freezes tensors holding zeros (the biases at init):
  # the tensor's whole update is scaled to move no coordinate further than
  # 0.1 |w| + absolute.
  "clippy": (
    "opt, then clippy(absolute=0.01)",
    lambda opt: optax.chain(opt, clipjax.clippy(absolute=0.01)),
  ),
}


def add_methods_argument(parser: argparse.ArgumentParser, default: Sequence[str]):
  """Adds ``--methods``, a comma-separated list of ``METHODS`` names."""
  parser.add_argument(
    "--methods",
    default=",".join(default),
    help="comma-separated, from: " + ", ".join(METHODS),
  )


def chosen_methods(parser: argparse.ArgumentParser, text: str) -> list[str]:
  """The names in ``--methods``; exits through ``parser.error`` on a bad one."""
  methods = [m.strip() for m in text.split(",") if m.strip()]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown or not methods:
    parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
  return methods

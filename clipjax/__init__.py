"""clipjax: gradient clipping and compression as composable optax transformations."""

from clipjax import compression as compression
from clipjax import distributed as distributed
from clipjax import privacy as privacy
from clipjax._adaptive import AdaGCState as AdaGCState
from clipjax._adaptive import AutoClipState as AutoClipState
from clipjax._adaptive import QuantileClipState as QuantileClipState
from clipjax._adaptive import SkipAndClipState as SkipAndClipState
from clipjax._adaptive import SpamClipState as SpamClipState
from clipjax._adaptive import ZClipState as ZClipState
from clipjax._adaptive import adagc as adagc
from clipjax._adaptive import autoclip as autoclip
from clipjax._adaptive import clippy as clippy
from clipjax._adaptive import quantile_clip as quantile_clip
from clipjax._adaptive import skip_and_clip as skip_and_clip
from clipjax._adaptive import spam_clip as spam_clip
from clipjax._adaptive import zclip as zclip
from clipjax._clipping import adaptive_grad_clip as adaptive_grad_clip
from clipjax._clipping import clip as clip
from clipjax._clipping import clip_by_block_rms as clip_by_block_rms
from clipjax._clipping import clip_by_global_norm as clip_by_global_norm
from clipjax._clipping import clip_by_group_norm as clip_by_group_norm
from clipjax._clipping import clip_by_norm as clip_by_norm
from clipjax._clipping import unitwise_clip as unitwise_clip
from clipjax._clipping import unitwise_norm as unitwise_norm
from clipjax._layout import Stacked as Stacked
from clipjax._norms import global_norm as global_norm
from clipjax._per_example import PerExampleClipInfo as PerExampleClipInfo
from clipjax._per_example import (
  per_example_clipped_grad as per_example_clipped_grad,
)
from clipjax._per_example import (
  per_example_global_norm_clip as per_example_global_norm_clip,
)
from clipjax._per_example import (
  per_example_layer_norm_clip as per_example_layer_norm_clip,
)
from clipjax._stats import ClipStats as ClipStats
from clipjax._stats import clip_stats as clip_stats
from clipjax.compression import CompressionStats as CompressionStats
from clipjax.compression import CompressState as CompressState
from clipjax.compression import compress as compress
from clipjax.compression import compression_stats as compression_stats
from clipjax.compression import dgc as dgc

__version__ = "0.1.0"  # the one source: pyproject.toml reads it (setuptools dynamic)

__all__ = (
  "AdaGCState",
  "AutoClipState",
  "ClipStats",
  "CompressState",
  "CompressionStats",
  "PerExampleClipInfo",
  "QuantileClipState",
  "SkipAndClipState",
  "SpamClipState",
  "Stacked",
  "ZClipState",
  "adagc",
  "adaptive_grad_clip",
  "autoclip",
  "clip",
  "clip_by_block_rms",
  "clip_by_global_norm",
  "clip_by_group_norm",
  "clip_by_norm",
  "clip_stats",
  "clippy",
  "compress",
  "compression",
  "compression_stats",
  "dgc",
  "distributed",
  "global_norm",
  "per_example_clipped_grad",
  "per_example_global_norm_clip",
  "per_example_layer_norm_clip",
  "privacy",
  "quantile_clip",
  "skip_and_clip",
  "spam_clip",
  "unitwise_clip",
  "unitwise_norm",
  "zclip",
)

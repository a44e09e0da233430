"""clipjax: gradient clipping and compression as composable optax transformations."""

from clipjax._clipping import adaptive_grad_clip as adaptive_grad_clip
from clipjax._clipping import clip as clip
from clipjax._clipping import clip_by_block_rms as clip_by_block_rms
from clipjax._clipping import clip_by_global_norm as clip_by_global_norm
from clipjax._clipping import clip_by_group_norm as clip_by_group_norm
from clipjax._clipping import clip_by_norm as clip_by_norm
from clipjax._clipping import unitwise_clip as unitwise_clip
from clipjax._clipping import unitwise_norm as unitwise_norm
from clipjax._norms import global_norm as global_norm
from clipjax._per_example import PerExampleClipInfo as PerExampleClipInfo
from clipjax._per_example import (
  per_example_global_norm_clip as per_example_global_norm_clip,
)
from clipjax._per_example import (
  per_example_layer_norm_clip as per_example_layer_norm_clip,
)
from clipjax._stats import ClipStats as ClipStats
from clipjax._stats import clip_stats as clip_stats

__version__ = "0.1.0"

__all__ = (
  "ClipStats",
  "PerExampleClipInfo",
  "adaptive_grad_clip",
  "clip",
  "clip_by_block_rms",
  "clip_by_global_norm",
  "clip_by_group_norm",
  "clip_by_norm",
  "clip_stats",
  "global_norm",
  "per_example_global_norm_clip",
  "per_example_layer_norm_clip",
  "unitwise_clip",
  "unitwise_norm",
)

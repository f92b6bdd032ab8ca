"""Model compression: making a trained model smaller or faster while keeping what it learned —
quantization, pruning and knowledge distillation — each in its own module over the shared
models, checkpoints and training loops."""

from lmforge.compress.distill import DistillConfig, DistillResult, distill
from lmforge.compress.prune import (
    PruneReport,
    prune,
    prune_checkpoint,
    prune_ffn,
    prune_heads,
    prune_magnitude,
)
from lmforge.compress.quantize import (
    QuantizedLinear,
    QuantizeSummary,
    quantize,
    quantize_checkpoint,
)

__all__ = [
    "DistillConfig", "DistillResult", "PruneReport", "distill", "prune", "prune_checkpoint", "prune_ffn",
    "prune_heads", "prune_magnitude", "QuantizedLinear", "QuantizeSummary", "quantize", "quantize_checkpoint",
]

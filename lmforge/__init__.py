"""lmforge: train, evaluate and sample Transformer language models in one small PyTorch codebase.

    import lmforge
    ckpt = lmforge.load("runs/quickstart/run")   # a checkpoint or run folder (or a HF GPT-2 folder)
    logits = ckpt.model(ids)                     # (B, T, vocab)
    [out] = ckpt.generate("The with statement", max_new_tokens=50, temperature=0.8)

Training, decoding and data live in `lmforge.train`, `lmforge.generate` and `lmforge.data`.
"""

__version__ = "0.1.0"

from lmforge.checkpoint import Checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.models import GPT, GPT_PRESETS, GPTConfig  # noqa: E402
from lmforge.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

load = load_checkpoint


__all__ = [
    "GPT", "GPT_PRESETS", "Checkpoint", "GPTConfig", "LmforgeError", "Tokenizer",
    "load", "load_checkpoint", "save_checkpoint", "train_tokenizer",
]

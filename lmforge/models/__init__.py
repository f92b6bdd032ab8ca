"""Model families: one file each, built from the shared blocks in `lmforge.nn`."""

from lmforge.models.gpt import GPT, GPT_PRESETS, GPTConfig

__all__ = ["GPT", "GPT_PRESETS", "GPTConfig"]

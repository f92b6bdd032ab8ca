"""Data: text sources, `lmforge prepare` (tokenizer + token shards), and the batch loader."""

from lmforge.data.loader import RandomBatches, TokenData, iter_windows, open_data
from lmforge.data.prepare import PrepareConfig, is_data_dir, prepare
from lmforge.data.sources import clean_text, describe_source, read_documents, source_fingerprint

__all__ = [
    "PrepareConfig",
    "RandomBatches",
    "TokenData",
    "clean_text",
    "describe_source",
    "is_data_dir",
    "iter_windows",
    "open_data",
    "prepare",
    "read_documents",
    "source_fingerprint",
]

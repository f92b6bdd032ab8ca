"""Model families: one file each, built from the shared blocks in `lmforge.nn`."""

from lmforge.models.bert import BERT_PRESETS, Bert, BertConfig, BertOutput
from lmforge.models.encoder_decoder import ENCDEC_PRESETS, EncoderDecoder, EncoderDecoderConfig
from lmforge.models.gpt import GPT, GPT_PRESETS, GPTConfig

__all__ = [
    "BERT_PRESETS", "ENCDEC_PRESETS", "GPT", "GPT_PRESETS", "Bert", "BertConfig", "BertOutput",
    "EncoderDecoder", "EncoderDecoderConfig", "GPTConfig",
]

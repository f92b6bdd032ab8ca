"""Tokenizers: byte-level BPE (GPT-2 style) and character-level, both on the `tokenizers` library.

Every kind is a `tokenizers.Tokenizer` underneath, saved as `tokenizer.json` with a
`tokenizer_config.json` beside it, the layout Hugging Face's `PreTrainedTokenizerFast` loads, so
a checkpoint's tokenizer works in `transformers` as it is. The character tokenizer is a word-level
model over single characters with a `Fuse` decoder (no spaces inserted between tokens).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as _Backend

from lmforge.errors import LmforgeError

KINDS = ("bpe", "char")
EOS_TOKEN = "<|endoftext|>"  # GPT-2's document separator
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the facts lmforge needs: its kind and special tokens."""

    def __init__(self, backend: _Backend, kind: str, eos_token: str | None = None,
                 bos_token: str | None = None, pad_token: str | None = None, unk_token: str | None = None):
        self.backend = backend
        self.kind = kind
        self.eos_token, self.bos_token, self.pad_token, self.unk_token = eos_token, bos_token, pad_token, unk_token

    # --- ids -----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    # --- text <-> ids --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.kind == "char":
            self._check_chars(texts)
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _check_chars(self, texts: Sequence[str]) -> None:
        vocab = self.backend.get_vocab()
        for text in texts:
            text = self.backend.normalizer.normalize_str(text) if self.backend.normalizer else text
            unknown = sorted({ch for ch in set(text) if ch not in vocab})
            if unknown:
                shown = ", ".join(repr(ch) for ch in unknown[:10])
                raise LmforgeError(
                    f"text has {len(unknown)} character(s) the char tokenizer has never seen ({shown}); "
                    f"a char tokenizer only knows the {self.vocab_size} characters of its training data"
                )

    # --- files ---------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / TOKENIZER_FILE))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "lmforge_kind": self.kind,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        for name in ("eos_token", "bos_token", "pad_token", "unk_token"):
            if getattr(self, name) is not None:
                config[name] = getattr(self, name)
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json`), or GPT-2's `vocab.json`+`merges.txt`."""
        directory = Path(directory)
        config_path = directory / TOKENIZER_CONFIG_FILE
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        special = {k: _token_str(config.get(k)) for k in ("eos_token", "bos_token", "pad_token", "unk_token")}
        if (directory / TOKENIZER_FILE).is_file():
            backend = _Backend.from_file(str(directory / TOKENIZER_FILE))
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            backend = _Backend(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
        else:
            raise LmforgeError(
                f"no tokenizer in {str(directory)!r}: expected {TOKENIZER_FILE} or vocab.json + merges.txt"
            )
        kind = config.get("lmforge_kind") or ("bpe" if isinstance(backend.model, models.BPE) else "external")
        return cls(backend, kind, **special)


def _token_str(value) -> str | None:
    # transformers may store special tokens as {"content": ..., ...} dicts
    if isinstance(value, dict):
        return value.get("content")
    return value


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int | None = None) -> Tokenizer:
    """Train a tokenizer of `kind` on an iterable of documents."""
    if kind == "char":
        chars = sorted({ch for text in texts for ch in text})
        if not chars:
            raise LmforgeError("cannot train a char tokenizer on empty text")
        backend = _Backend(models.WordLevel({ch: i for i, ch in enumerate(chars)}, unk_token=None))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        return Tokenizer(backend, "char")
    if kind == "bpe":
        vocab_size = vocab_size or 8192
        if vocab_size < 256 + 1:
            raise LmforgeError(f"--vocab-size for byte-level BPE must be >= 257 (256 bytes + {EOS_TOKEN}), got {vocab_size}")
        backend = _Backend(models.BPE())
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return Tokenizer(backend, "bpe", eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN)
    raise LmforgeError(f"unknown tokenizer {kind!r}; choose one of: {', '.join(KINDS)}")

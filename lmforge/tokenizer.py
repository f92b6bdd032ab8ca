"""Tokenizers: byte-level BPE (GPT-2 style), character-level and WordPiece (BERT style), all on the
`tokenizers` library.

Every kind is a `tokenizers.Tokenizer` underneath, saved as `tokenizer.json` with a
`tokenizer_config.json` beside it, the layout Hugging Face's `PreTrainedTokenizerFast` loads, so
a checkpoint's tokenizer works in `transformers` as it is. The character tokenizer is a word-level
model over single characters with a `Fuse` decoder (no spaces inserted between tokens).

WordPiece is BERT's pipeline: lowercasing `BertNormalizer`, `BertPreTokenizer`, "##" continuation
pieces, and a post-processor that adds [CLS] ... [SEP] (and "[SEP] B [SEP]" for a pair). Only the
encoder-side `encode_for_encoder` adds those special tokens; `encode` never does, for every kind.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _Backend

from lmforge.errors import LmforgeError

KINDS = ("bpe", "char")  # the kinds `lmforge prepare` offers (causal-LM data)
TRAINABLE_KINDS = (*KINDS, "wordpiece")  # WordPiece: for BERT-style encoders
EOS_TOKEN = "<|endoftext|>"  # GPT-2's document separator
# T5's special tokens, for sequence-to-sequence tokenizers: padding (also the decoder's start
# token), end of sequence, unknown; then the span-corruption sentinels <extra_id_0>, <extra_id_1>, ...
SEQ2SEQ_SPECIALS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
SENTINEL = "<extra_id_{}>"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
VOCAB_FILE = "vocab.txt"  # BERT's WordPiece vocabulary: one token per line, in id order
# BERT's special tokens, by role; a trained WordPiece vocabulary starts with them in this order
BERT_SPECIALS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
SPECIAL_ROLES = (
    "eos_token",
    "bos_token",
    "pad_token",
    "unk_token",
    "cls_token",
    "sep_token",
    "mask_token",
)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the facts lmforge needs: its kind and special tokens."""

    def __init__(
        self,
        backend: _Backend,
        kind: str,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        cls_token: str | None = None,
        sep_token: str | None = None,
        mask_token: str | None = None,
        chat_template: str | list | None = None,
    ):
        self.backend = backend
        self.kind = kind
        # Hugging Face's `chat_template` (a Jinja2 string, or a list of named ones), kept so that
        # every checkpoint saved from this tokenizer renders chats the way it was trained to
        self.chat_template = chat_template
        self.eos_token, self.bos_token, self.pad_token, self.unk_token = (
            eos_token,
            bos_token,
            pad_token,
            unk_token,
        )
        self.cls_token, self.sep_token, self.mask_token = cls_token, sep_token, mask_token

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

    @property
    def cls_id(self) -> int | None:
        return self.token_to_id(self.cls_token)

    @property
    def sep_id(self) -> int | None:
        return self.token_to_id(self.sep_token)

    @property
    def mask_id(self) -> int | None:
        return self.token_to_id(self.mask_token)

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

    @contextlib.contextmanager
    def bare_backend(self) -> Iterator[_Backend]:
        """The backend with its padding and truncation off, restored afterwards: the backend is
        shared, and a loaded tokenizer.json may pad or truncate every input (MiniLM's pads to 128)."""
        saved = self.backend.truncation, self.backend.padding
        self.backend.no_truncation()
        self.backend.no_padding()
        try:
            yield self.backend
        finally:
            _restore(self.backend, *saved)

    def encode_for_encoder(
        self,
        texts: str | Sequence[str],
        pairs: Sequence[str] | None = None,
        max_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Batch encoder inputs, special tokens included: "[CLS] A [SEP]" or "[CLS] A [SEP] B [SEP]".

        Returns (B, T) long tensors `input_ids`, `token_type_ids` (0 for A, 1 for B) and
        `attention_mask` (1 for tokens, 0 for padding), right-padded to the longest row. With
        `max_length` (special tokens included) the longer of A and B loses tokens first, as HF's
        truncation="longest_first".
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if pairs is not None and len(pairs) != len(texts):
            raise LmforgeError(
                f"got {len(texts)} texts but {len(pairs)} pairs; give one pair per text"
            )
        if self.kind == "char":
            self._check_chars([*texts, *(pairs or [])])
        inputs = texts if pairs is None else list(zip(texts, pairs, strict=True))
        # truncation is set on the shared backend for this call only, and padding done here
        with self.bare_backend() as backend:
            try:
                if max_length is not None:
                    backend.enable_truncation(max_length, strategy="longest_first")
                encodings = backend.encode_batch(inputs, add_special_tokens=True)
            except Exception as e:  # e.g. max_length shorter than the special tokens
                raise LmforgeError(f"cannot encode with max_length={max_length}: {e}") from e
        B, T = len(encodings), max((len(e.ids) for e in encodings), default=0)
        pad = self.pad_id if self.pad_id is not None else 0
        out = {
            "input_ids": torch.full((B, T), pad, dtype=torch.long),
            "token_type_ids": torch.zeros(B, T, dtype=torch.long),
            "attention_mask": torch.zeros(B, T, dtype=torch.long),
        }
        for i, e in enumerate(encodings):
            n = len(e.ids)
            out["input_ids"][i, :n] = torch.tensor(e.ids, dtype=torch.long)
            out["token_type_ids"][i, :n] = torch.tensor(e.type_ids, dtype=torch.long)
            out["attention_mask"][i, :n] = 1
        return out

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
        for name in SPECIAL_ROLES:
            if getattr(self, name) is not None:
                config[name] = getattr(self, name)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        if isinstance(self.backend.model, models.WordPiece):
            # BERT tooling reads vocab.txt and do_lower_case rather than tokenizer.json
            self.backend.model.save(str(directory))
            normalizer = self.backend.normalizer
            config["do_lower_case"] = bool(getattr(normalizer, "lowercase", False))
            config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json`), GPT-2's `vocab.json`+`merges.txt`,
        or BERT's `vocab.txt` (lowercasing as `do_lower_case` in tokenizer_config.json says)."""
        directory = Path(directory)
        config_path = directory / TOKENIZER_CONFIG_FILE
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        special = {k: _token_str(config.get(k)) for k in SPECIAL_ROLES}
        if (directory / TOKENIZER_FILE).is_file():
            backend = _Backend.from_file(str(directory / TOKENIZER_FILE))
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            backend = _Backend(
                models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
            )
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
        elif (directory / VOCAB_FILE).is_file():
            special = {k: v or BERT_SPECIALS.get(k) for k, v in special.items()}
            backend = _Backend(
                models.WordPiece.from_file(
                    str(directory / VOCAB_FILE), unk_token=special["unk_token"]
                )
            )
            _bert_pipeline(
                backend,
                special,
                lowercase=config.get("do_lower_case", True),
                strip_accents=config.get("strip_accents"),
                chinese=config.get("tokenize_chinese_chars", True),
            )
        else:
            raise LmforgeError(
                f"no tokenizer in {str(directory)!r}: expected {TOKENIZER_FILE}, vocab.json + merges.txt, "
                f"or {VOCAB_FILE}"
            )
        kind = config.get("lmforge_kind") or _kind_of(backend)
        if kind == "wordpiece":
            # BERT files without a tokenizer_config.json still mean BERT's special tokens
            vocab = backend.get_vocab()
            special = {
                k: v or (BERT_SPECIALS.get(k) if BERT_SPECIALS.get(k) in vocab else None)
                for k, v in special.items()
            }
            # sentence-transformers' tokenizer.json pads and truncates every input to 128; lmforge
            # pads to the longest row and truncates only when asked
            backend.no_padding()
            backend.no_truncation()
        return cls(backend, kind, **special, chat_template=config.get("chat_template"))


def _kind_of(backend: _Backend) -> str:
    if isinstance(backend.model, models.BPE):
        return "bpe"
    return "wordpiece" if isinstance(backend.model, models.WordPiece) else "external"


def _restore(backend: _Backend, truncation: dict | None, padding: dict | None) -> None:
    """Put back the truncation and padding settings `backend.truncation`/`.padding` reported."""
    if truncation is None:
        backend.no_truncation()
    else:
        backend.enable_truncation(**truncation)
    if padding is None:
        backend.no_padding()
    else:
        backend.enable_padding(**padding)


def _bert_pipeline(
    backend: _Backend,
    special: dict[str, str | None],
    lowercase: bool,
    strip_accents: bool | None = None,
    chinese: bool = True,
) -> None:
    """BERT's normalizer, pre-tokenizer, decoder and [CLS]/[SEP] template on a WordPiece backend."""
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=chinese,
        strip_accents=strip_accents,
        lowercase=lowercase,
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    # special tokens are matched before normalisation, so "[MASK]" survives lowercasing
    backend.add_special_tokens(
        [t for t in special.values() if t is not None and backend.token_to_id(t) is not None]
    )
    cls, sep = special["cls_token"], special["sep_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, backend.token_to_id(cls)), (sep, backend.token_to_id(sep))],
    )


def _token_str(value) -> str | None:
    # transformers may store special tokens as {"content": ..., ...} dicts
    if isinstance(value, dict):
        return value.get("content")
    return value


def sentinel_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids of <extra_id_0>, <extra_id_1>, ... as far as the tokenizer has them (T5 sentinels)."""
    ids = []
    while (i := tokenizer.token_to_id(SENTINEL.format(len(ids)))) is not None:
        ids.append(i)
    return ids


def train_tokenizer(
    kind: str,
    texts: Iterable[str],
    vocab_size: int | None = None,
    *,
    seq2seq: bool = False,
    sentinels: int = 0,
) -> Tokenizer:
    """Train a tokenizer of `kind` on an iterable of documents.

    `seq2seq=True` (byte-level BPE only) gives T5's special tokens instead of GPT-2's
    end-of-text: <pad> (id 0), </s> (1), <unk> (2), then `sentinels` span-corruption sentinels."""
    if (seq2seq or sentinels) and kind != "bpe":
        raise LmforgeError(
            f"sequence-to-sequence special tokens and sentinels need --tokenizer bpe, got {kind!r}"
        )
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
        specials = (
            [*SEQ2SEQ_SPECIALS.values(), *(SENTINEL.format(i) for i in range(sentinels))]
            if seq2seq or sentinels
            else [EOS_TOKEN]
        )
        if vocab_size < 256 + len(specials):
            raise LmforgeError(
                f"--vocab-size for byte-level BPE must be >= {256 + len(specials)} (256 bytes + "
                f"{len(specials)} special tokens), got {vocab_size}"
            )
        backend = _Backend(models.BPE())
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        if seq2seq or sentinels:
            return Tokenizer(backend, "bpe", **SEQ2SEQ_SPECIALS)
        return Tokenizer(
            backend, "bpe", eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN
        )
    if kind == "wordpiece":
        vocab_size = vocab_size or 8192
        if vocab_size < len(BERT_SPECIALS) + 1:
            raise LmforgeError(
                f"--vocab-size for WordPiece must be >= {len(BERT_SPECIALS) + 1}, got {vocab_size}"
            )
        backend = _Backend(models.WordPiece(unk_token=BERT_SPECIALS["unk_token"]))
        backend.normalizer = normalizers.BertNormalizer(lowercase=True)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=list(BERT_SPECIALS.values()), show_progress=False
        )
        backend.train_from_iterator(texts, trainer=trainer)
        _bert_pipeline(backend, BERT_SPECIALS, lowercase=True)
        return Tokenizer(backend, "wordpiece", **BERT_SPECIALS)
    raise LmforgeError(f"unknown tokenizer {kind!r}; choose one of: {', '.join(TRAINABLE_KINDS)}")

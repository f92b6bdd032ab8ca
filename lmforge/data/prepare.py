"""`lmforge prepare`: clean a text source, train a tokenizer on it, write token shards.

    DATA_DIR/
      manifest.json                what was prepared from what, token counts, shard list
      tokenizer.json               + tokenizer_config.json, trained on this data
      train-00000.bin, ...         token ids, raw little-endian numpy arrays (uint16 or uint32)
      val-00000.bin, ...

For BERT-style pretraining (`--tokenizer wordpiece`) the stream keeps sentence structure: no
separators are written, and each split gets two index arrays instead, `{split}-sentences.npy`
(where each sentence starts in the split's stream, plus its end) and `{split}-documents.npy`
(the index of each document's first sentence, plus the sentence count), which next-sentence
prediction needs to draw true and random next segments (see `lmforge.data.mlm`).

As in nanoGPT, the documents become one token stream (an end-of-text token after each document,
or "\\n\\n" between documents for the char tokenizer, which has no special tokens); the first
(1 - val_fraction) of the stream is the train split and the rest the val split. Shards are plain
arrays so `np.memmap` reads them without loading a whole corpus into memory.

The source is read twice, to train the tokenizer and to tokenize, so no corpus has to fit in
memory; both passes are hashed and must agree, which catches files changing underneath.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lmforge.config import check, check_choice
from lmforge.data.sources import Fingerprint, describe_source, read_documents, split_sentences
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir
from lmforge.tokenizer import BERT_SPECIALS, TRAINABLE_KINDS, Tokenizer, train_tokenizer

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # manifest name -> on-disk dtype
DEFAULT_BPE_VOCAB = 8192
SENTENCES_FILE = "{split}-sentences.npy"  # wordpiece data: sentence starts in the split's stream
DOCUMENTS_FILE = "{split}-documents.npy"  # wordpiece data: each document's first sentence
DOC_SEPARATOR = "\n\n"  # between documents when the tokenizer has no end-of-text token
_CHUNK_CHARS = 1 << 20  # the tokenizer sees at most ~1M characters in one string
_BATCH_CHARS = 1 << 22  # characters per `encode_batch` call (the tokenizer parallelises within it)
_COPY_BYTES = 1 << 24
_STREAM_FILE = "stream.tmp"
# a cut right after a newline that precedes a non-space character (see `_chunks`)
_CHUNK_BOUNDARY = re.compile(r"\n(?=\S)")


@dataclass
class PrepareConfig:
    source: str
    tokenizer: str = "bpe"  # bpe (GPT), wordpiece (BERT) or char
    vocab_size: int | None = None  # default 8192; a char vocabulary is the data's characters
    val_fraction: float = 0.1
    text_field: str = "text"  # the JSONL field holding the text
    shard_tokens: int = 100_000_000  # tokens per shard file at most
    # T5 span-corruption sentinels <extra_id_0..N-1> (byte-level BPE; with them the tokenizer
    # gets T5's <pad> </s> <unk> instead of <|endoftext|>)
    sentinels: int = 0
    # parallel text (sequence to sequence, see `lmforge.data.parallel`): `source` is the source
    # side and `target` the aligned target file, or `source` is one TSV/CSV/JSONL file with
    # `source_field` and `target_field`
    target: str | None = None
    source_field: str | None = None
    target_field: str | None = None
    val_source: str | None = None  # a separate validation set (else the last val_fraction)
    val_target: str | None = None
    max_length: int = 256  # parallel pairs with a side longer than this (in tokens) are dropped
    # parallel text: one BPE per side (each of vocab_size) instead of one joint vocabulary
    separate_tokenizers: bool = False
    # where a given tokenizer came from (`--tokenizer-from CKPT`), recorded in the manifest
    tokenizer_from: str | None = None

    def __post_init__(self) -> None:
        check(
            isinstance(self.source, str) and self.source != "",
            "source must name a data source, got an empty value",
        )
        check_choice("tokenizer", self.tokenizer, TRAINABLE_KINDS)
        if self.tokenizer == "char":
            self.vocab_size = None
        else:
            if self.vocab_size is None:
                self.vocab_size = DEFAULT_BPE_VOCAB
            smallest, why = (
                (257, "256 bytes + end-of-text")
                if self.tokenizer == "bpe"
                else (len(BERT_SPECIALS) + 1, "the special tokens + 1")
            )
            check(
                smallest <= self.vocab_size <= 2**32,
                f"vocab_size must be between {smallest} ({why}) and 2**32 for {self.tokenizer}, "
                f"got {self.vocab_size}",
            )
        check(
            0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}"
        )
        check(self.text_field != "", "text_field must name a JSONL field, got an empty value")
        check(self.shard_tokens >= 1, f"shard_tokens must be >= 1, got {self.shard_tokens}")
        check(0 <= self.sentinels <= 1000, f"sentinels must be in [0, 1000], got {self.sentinels}")
        check(self.max_length >= 2, f"max_length must be >= 2 tokens, got {self.max_length}")
        if self.parallel:
            check(
                self.tokenizer == "bpe",
                f"parallel text is prepared with --tokenizer bpe (one joint vocabulary), got {self.tokenizer!r}",
            )
            check(
                (self.source_field is None) == (self.target_field is None),
                "give both --source-field and --target-field (the two sides of a pairs file)",
            )
            check(
                (self.val_source is None) == (self.val_target is None) or self.target is None,
                "give both --val-data and --val-target (the two sides of the validation set)",
            )
            if self.target is None:
                self.val_target = None
        elif self.sentinels:
            check(self.tokenizer == "bpe", f"sentinels need --tokenizer bpe, got {self.tokenizer!r}")
        check(
            not self.separate_tokenizers or self.parallel,
            "separate_tokenizers applies to parallel text only (--target or --source-field)",
        )

    @property
    def parallel(self) -> bool:
        """Whether this prepares sentence pairs (sequence to sequence) rather than one stream."""
        return self.target is not None or self.source_field is not None


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids below 65536 (GPT-2's 50257 fits); larger vocabularies need uint32."""
    return DTYPES["uint16"] if vocab_size <= 2**16 else DTYPES["uint32"]


def is_data_dir(path: Path) -> bool:
    """Whether `path` holds an lmforge data folder (a manifest with a format version and shards)."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "format_version" in manifest and "tokens" in manifest


def prepare(
    config: PrepareConfig, out_dir: str | Path, progress: bool = True, tokenizer: Tokenizer | None = None,
    source_tokenizer: Tokenizer | None = None,
) -> dict[str, Any]:
    """Build DATA_DIR at `out_dir` from `config.source` and return its manifest.

    A given `tokenizer` (a pretrained model's: `tokenizer_of_checkpoint`) is used as it is, so
    that the model can go on training on this data (`lmforge train --init-from`); else one of
    `config.tokenizer`'s kind is trained on the data. The folder is written whole into
    `.NAME.tmp` beside `out_dir` and renamed into place, so a failed run leaves the previous data
    folder (if any) untouched.
    """
    if config.parallel:
        from lmforge.data.parallel import prepare_parallel

        return prepare_parallel(config, out_dir, progress, tokenizer, source_tokenizer)
    if source_tokenizer is not None:
        raise LmforgeError("a separate source tokenizer applies to parallel text only (sentence pairs)")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    description = describe_source(config.source)  # resolves SRC: a bad path fails before any work

    # pass 1: hash and count the documents while the tokenizer trains on them
    fingerprint, counts = Fingerprint(), {"documents": 0, "characters": 0}
    documents = tqdm(
        read_documents(config.source, config.text_field),
        desc="training tokenizer",
        unit=" docs",
        disable=not progress,
    )
    if tokenizer is None:
        texts = _training_texts(documents, fingerprint, counts, config.tokenizer)
        tokenizer = train_tokenizer(config.tokenizer, texts, config.vocab_size, sentinels=config.sentinels)
    else:  # the fingerprint and counts still come from this pass
        for _ in _training_texts(documents, fingerprint, counts, tokenizer.kind):
            pass
    dtype = token_dtype(tokenizer.vocab_size)

    with atomic_dir(out_dir) as tmp:
        # pass 2: tokenize into one stream file, then cut it into train/val shards
        stream = tmp / _STREAM_FILE
        by_sentence = tokenizer.kind == "wordpiece"
        sentence_lengths: list[int] = []  # wordpiece: tokens in each sentence
        document_sizes: list[int] = []  # wordpiece: sentences in each document
        total = _tokenize(
            config,
            tokenizer,
            dtype,
            stream,
            fingerprint.hexdigest(),
            counts["characters"],
            progress,
            (sentence_lengths, document_sizes) if by_sentence else None,
        )
        n_val = round(total * config.val_fraction)
        n_train = total - n_val
        sentences = {}
        if by_sentence:
            n_train, sentences = _write_sentence_index(
                tmp, sentence_lengths, document_sizes, n_train
            )
            n_val = total - n_train
        check(
            n_train > 0,
            f"data source {config.source!r} gives no training tokens with val_fraction={config.val_fraction}",
        )
        shards = {
            "train": _write_shards(stream, dtype, 0, n_train, "train", tmp, config.shard_tokens),
            "val": _write_shards(stream, dtype, n_train, n_val, "val", tmp, config.shard_tokens),
        }
        stream.unlink()
        tokenizer.save(tmp)
        warnings = []
        if n_val == 0:
            warnings.append(
                f"no validation split (val_fraction={config.val_fraction}): training cannot report "
                "val loss or keep a best checkpoint"
            )
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": config.source,
            "source_description": description,
            "source_sha256": fingerprint.hexdigest(),
            "text_field": config.text_field,
            "tokenizer": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "dtype": dtype.name,
            "documents": counts["documents"],
            "characters": counts["characters"],
            "tokens": {"train": n_train, "val": n_val},
            "shards": shards,
            **({"sentences": sentences} if by_sentence else {}),
            "val_fraction": config.val_fraction,
            "shard_tokens": config.shard_tokens,
            "warnings": warnings,
            **({"tokenizer_from": config.tokenizer_from} if config.tokenizer_from else {}),
            "created_by": f"lmforge {_version()}",
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def tokenizer_of_checkpoint(path: str | Path) -> tuple[Tokenizer, Tokenizer | None]:
    """The tokenizer of a checkpoint (an lmforge checkpoint or run folder, or a Hugging Face
    folder), without loading its weights; and its source-side tokenizer when it has one (an
    encoder-decoder with a vocabulary per side)."""
    from lmforge.checkpoint import SOURCE_TOKENIZER_DIR, resolve_checkpoint_dir

    directory = resolve_checkpoint_dir(path)
    source = directory / SOURCE_TOKENIZER_DIR
    return Tokenizer.load(directory), Tokenizer.load(source) if source.is_dir() else None


def _check_out_dir(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise LmforgeError(
            f"output {str(out_dir)!r} exists and is not a folder; choose a folder for the prepared data"
        )
    if any(out_dir.iterdir()) and not is_data_dir(out_dir):
        raise LmforgeError(
            f"output folder {str(out_dir)!r} is not empty and is not an lmforge data folder (no valid "
            f"{MANIFEST_FILE}); choose a new or empty folder (a previous data folder is replaced)"
        )


def _chunks(text: str, size: int = _CHUNK_CHARS) -> list[str]:
    """Split a long document into pieces of about `size` characters, cutting only at line starts.

    A cut right after "\\n" and before a non-space character cannot change the tokens: byte-level
    BPE's pre-tokenizer ends every whitespace run there and starts a new word, and the char
    tokenizer works per character anyway. So encoding the pieces equals encoding the whole.
    """
    pieces, start = [], 0
    while len(text) - start > size:
        match = _CHUNK_BOUNDARY.search(text, start + size)
        if match is None:
            break
        pieces.append(text[start : match.end()])
        start = match.end()
    pieces.append(text[start:])
    return pieces


def _training_texts(
    documents: Iterator[str], fingerprint: Fingerprint, counts: dict[str, int], kind: str
) -> Iterator[str]:
    for document in documents:
        fingerprint.update(document)
        counts["documents"] += 1
        counts["characters"] += len(document)
        yield from _chunks(document)
    if kind == "char":
        yield DOC_SEPARATOR  # its "\n" must be in the vocabulary even if no document has one


def _tokenize(
    config: PrepareConfig,
    tokenizer: Tokenizer,
    dtype: np.dtype,
    stream: Path,
    expected_sha256: str,
    characters: int,
    progress: bool,
    structure: tuple[list[int], list[int]] | None = None,
) -> int:
    """Write the whole token stream to `stream`; return its length in tokens.

    With `structure` = (sentence_lengths, document_sizes) the documents are encoded sentence by
    sentence with no separators, and both lists are filled in.
    """
    fingerprint, total = Fingerprint(), 0
    documents = read_documents(config.source, config.text_field)
    with (
        open(stream, "wb") as f,
        tqdm(
            total=characters,
            desc="tokenizing",
            unit=" chars",
            unit_scale=True,
            disable=not progress,
        ) as bar,
    ):
        for batch in _batches(documents, _BATCH_CHARS):
            for document in batch:
                fingerprint.update(document)
            if structure is None:
                ids = _encode_documents(tokenizer, batch, first=total == 0)
            else:
                ids = _encode_sentences(tokenizer, batch, *structure)
            np.asarray(ids, dtype=dtype).tofile(f)
            total += len(ids)
            bar.update(sum(map(len, batch)))
    if fingerprint.hexdigest() != expected_sha256:
        raise LmforgeError(
            f"data source {config.source!r} changed while it was being prepared; run prepare again"
        )
    return total


def _batches(documents: Iterator[str], max_chars: int) -> Iterator[list[str]]:
    """Group documents into lists of about `max_chars` characters."""
    batch, chars = [], 0
    for document in documents:
        batch.append(document)
        chars += len(document)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode_documents(tokenizer: Tokenizer, documents: list[str], first: bool) -> list[int]:
    """Token ids of `documents` joined as one stream; `first` says they open the stream."""
    eos = tokenizer.eos_id
    separator = [] if eos is not None else tokenizer.encode(DOC_SEPARATOR)
    pieces = [_chunks(document) for document in documents]
    encoded = iter(tokenizer.encode_batch([chunk for chunks in pieces for chunk in chunks]))
    ids: list[int] = []
    for i, chunks in enumerate(pieces):
        if eos is None and (i > 0 or not first):
            ids.extend(separator)
        for _ in chunks:
            ids.extend(next(encoded))
        if eos is not None:
            ids.append(eos)
    return ids


def _encode_sentences(
    tokenizer: Tokenizer,
    documents: list[str],
    sentence_lengths: list[int],
    document_sizes: list[int],
) -> list[int]:
    """Token ids of `documents`, sentence after sentence; sentences with no tokens are dropped,
    and so are documents left with no sentence."""
    split = [split_sentences(document) for document in documents]
    encoded = iter(tokenizer.encode_batch([s for sentences in split for s in sentences]))
    ids: list[int] = []
    for sentences in split:
        kept = 0
        for _ in sentences:
            sentence = next(encoded)
            if sentence:
                ids.extend(sentence)
                sentence_lengths.append(len(sentence))
                kept += 1
        if kept:
            document_sizes.append(kept)
    return ids


def _write_sentence_index(
    out_dir: Path, sentence_lengths: list[int], document_sizes: list[int], n_train: int
) -> tuple[int, dict[str, Any]]:
    """Write `{split}-sentences.npy` and `{split}-documents.npy`; return the train token count
    (moved to the nearest sentence boundary) and the manifest's `sentences` entry.

    A document cut by the train/val boundary becomes two documents, one in each split.
    """
    starts = np.concatenate([[0], np.cumsum(sentence_lengths, dtype=np.int64)])
    doc_starts = np.concatenate([[0], np.cumsum(document_sizes, dtype=np.int64)])
    n_sentences = len(sentence_lengths)
    cut = int(np.abs(starts - n_train).argmin())  # the boundary nearest the token split
    if cut == n_sentences and n_sentences > 1 and n_train < starts[-1]:
        cut -= 1  # a val split was asked for: keep at least one sentence in it
    entry = {}
    for split, (first, last) in {"train": (0, cut), "val": (cut, n_sentences)}.items():
        sentence_starts = starts[first : last + 1] - starts[first]
        docs = doc_starts[(doc_starts > first) & (doc_starts < last)] - first
        documents = np.concatenate([[0], docs, [last - first]]).astype(np.int64)
        if last == first:
            documents = np.zeros(1, dtype=np.int64)
        files = {
            "sentences_file": SENTENCES_FILE.format(split=split),
            "documents_file": DOCUMENTS_FILE.format(split=split),
        }
        np.save(out_dir / files["sentences_file"], sentence_starts.astype(np.int64))
        np.save(out_dir / files["documents_file"], documents)
        entry[split] = {**files, "sentences": last - first, "documents": len(documents) - 1}
    return int(starts[cut]), entry


def _write_shards(
    stream: Path,
    dtype: np.dtype,
    start: int,
    count: int,
    split: str,
    out_dir: Path,
    shard_tokens: int,
) -> list[dict[str, Any]]:
    """Copy tokens [start, start + count) of the stream file into `{split}-00000.bin`, ..."""
    shards = []
    with open(stream, "rb") as src:
        src.seek(start * dtype.itemsize)
        for index, offset in enumerate(range(0, count, shard_tokens)):
            tokens = min(shard_tokens, count - offset)
            name = f"{split}-{index:05d}.bin"
            _copy_bytes(src, out_dir / name, tokens * dtype.itemsize)
            shards.append({"file": name, "tokens": tokens})
    return shards


def _copy_bytes(src, dst: Path, n_bytes: int) -> None:
    # in blocks, so a 100M-token shard never sits in memory whole
    with open(dst, "wb") as out:
        while n_bytes > 0:
            block = src.read(min(_COPY_BYTES, n_bytes))
            if not block:
                raise OSError(f"token stream ended early while writing {dst}")
            out.write(block)
            n_bytes -= len(block)


def _version() -> str:
    import lmforge

    version = getattr(lmforge, "__version__", None)
    if version:
        return version
    try:
        return importlib.metadata.version("lmforge")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"

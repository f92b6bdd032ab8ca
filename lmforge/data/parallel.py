"""Parallel text for sequence-to-sequence models: reading pairs, preparing them, batching them.

Sources of pairs (`read_pairs`):
- two aligned files, one sentence a line (`--data train.de.gz --target train.en.gz`); either may
  be gzipped; their line counts must agree;
- one TSV or CSV file with a header, or a JSONL file, with the source and target in named fields
  (`--source-field de --target-field en`).

`prepare_parallel` trains one joint byte-level BPE tokenizer on both sides (T5's special tokens:
<pad> 0, </s> 1, <unk> 2; sentinels on request), or with `separate_tokenizers` one per side (the
source's in `source_tokenizer/`, both with the same special ids), tokenizes every pair, appends </s> to both sides,
drops pairs with an empty side or a side longer than `max_length` tokens (the counts go into the
manifest), and writes, for each split,

    {split}-source.bin, {split}-target.bin      the sides' token ids, one pair after another
    {split}-offsets.npy                         (n + 1, 2) int64: pair i is source tokens
                                                off[i, 0]:off[i + 1, 0] and target off[i, 1]:off[i + 1, 1]

The val split comes from `--val-data/--val-target` when given, else it is the last `val_fraction`
of the pairs.

`BucketBatches` draws training batches as fairseq and HF's `group_by_length` do: each epoch
shuffles the pairs, sorts pools of 100 batches by length so that a batch holds pairs of similar
length (little padding), and shuffles the batch order; its state is (epoch, batch), so resuming
continues with the same batches.
"""

from __future__ import annotations

import csv
import functools
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lmforge.config import check_choice
from lmforge.data.sources import Fingerprint, _base_suffix, _open_binary, clean_text
from lmforge.data.tasks import IGNORE_INDEX
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir
from lmforge.tokenizer import Tokenizer

PARALLEL_FORMAT = "parallel"
SOURCE_TOKENIZER_DIR = "source_tokenizer"  # as in checkpoints (lmforge.checkpoint)
SPLITS = ("train", "val")
OFFSETS_FILE = "{split}-offsets.npy"
SIDE_FILE = "{split}-{side}.bin"
POOL_BATCHES = 100  # batches per length-sorted pool
_ENCODE_BATCH = 10_000  # pairs per encode_batch call


# ---- reading ------------------------------------------------------------------------------------
def read_pairs(
    source: str, target: str | None = None, source_field: str = "source", target_field: str = "target"
) -> Iterator[tuple[str, str]]:
    """(source, target) texts, cleaned (see `clean_text`) and stripped, in file order."""
    if target is not None:
        yield from _aligned_files(Path(source), Path(target))
        return
    path = Path(source)
    suffix = _base_suffix(path)
    if suffix not in (".tsv", ".csv", ".jsonl"):
        raise LmforgeError(
            f"{source!r}: a single pairs file must be .tsv, .csv or .jsonl (optionally .gz); "
            "for two aligned text files pass the target side with --target"
        )
    rows = _jsonl_rows(path) if suffix == ".jsonl" else _table_rows(path, suffix)
    for where, row in rows:
        missing = [f for f in (source_field, target_field) if f not in row]
        if missing:
            keys = ", ".join(map(repr, list(row)[:10])) or "none"
            raise LmforgeError(
                f"{where}: no field {missing[0]!r} (fields: {keys}); name the sides with "
                "--source-field and --target-field"
            )
        src, tgt = row[source_field], row[target_field]
        if not isinstance(src, str) or not isinstance(tgt, str):
            raise LmforgeError(f"{where}: fields {source_field!r} and {target_field!r} must be strings")
        yield clean_text(src).strip(), clean_text(tgt).strip()


def read_lines(path: str | Path) -> list[str]:
    """A text file's lines (gzip ok), without their line ends; blank lines kept, since they align
    with the other side of a parallel corpus."""
    return list(_lines(Path(path)))


def _lines(path: Path) -> Iterator[str]:
    if not path.is_file():
        raise LmforgeError(f"file {str(path)!r} does not exist")
    try:
        with _open_binary(path) as f:
            for raw in io.TextIOWrapper(f, encoding="utf-8", newline="\n"):
                yield raw.rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{str(path)!r} is not UTF-8 text ({e.reason}); convert it first") from e
    except (OSError, EOFError) as e:
        raise LmforgeError(f"cannot read {str(path)!r}: {e}") from e


def _aligned_files(source: Path, target: Path) -> Iterator[tuple[str, str]]:
    src_lines, tgt_lines = _lines(source), _lines(target)
    n = 0
    while True:
        src, tgt = next(src_lines, None), next(tgt_lines, None)
        if src is None or tgt is None:
            if src is not None or tgt is not None:
                longer, shorter = (source, target) if src is not None else (target, source)
                raise LmforgeError(
                    f"the parallel files are not aligned: {str(shorter)!r} ends after {n} lines "
                    f"but {str(longer)!r} has more; they need one sentence a line, line for line"
                )
            return
        n += 1
        yield clean_text(src).strip(), clean_text(tgt).strip()


def _table_rows(path: Path, suffix: str) -> Iterator[tuple[str, dict]]:
    delimiter = "\t" if suffix == ".tsv" else ","
    lines = _lines(path)
    quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting)
    header = next(reader, None)
    if header is None:
        raise LmforgeError(f"{str(path)!r} is empty; it needs a header line naming its columns")
    for lineno, values in enumerate(reader, 2):
        if not values:
            continue
        yield f"{path}:{lineno}", dict(zip(header, values))


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    for lineno, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{where}: not valid JSON ({e.msg}); JSONL needs one object a line") from e
        if not isinstance(record, dict):
            raise LmforgeError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


# ---- preparing ----------------------------------------------------------------------------------
def encode_pairs(
    tokenizer: Tokenizer, pairs: list[tuple[str, str]], eos_id: int,
    source_tokenizer: Tokenizer | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of both sides, each ending in `eos_id` (as T5 and Marian train); the sources
    with `source_tokenizer` when the sides have separate vocabularies."""
    sources = (source_tokenizer or tokenizer).encode_batch([s for s, _ in pairs])
    targets = tokenizer.encode_batch([t for _, t in pairs])
    return [s + [eos_id] for s in sources], [t + [eos_id] for t in targets]


def write_split(
    out_dir: Path,
    split: str,
    sources: list[list[int]],
    targets: list[list[int]],
    dtype: np.dtype,
) -> dict[str, int]:
    """Write one split's token files and offsets; return its counts for the manifest."""
    offsets = np.zeros((len(sources) + 1, 2), dtype=np.int64)
    offsets[1:, 0] = np.cumsum([len(s) for s in sources])
    offsets[1:, 1] = np.cumsum([len(t) for t in targets])
    for side, rows in (("source", sources), ("target", targets)):
        flat = np.fromiter((t for row in rows for t in row), dtype=dtype, count=-1)
        flat.tofile(out_dir / SIDE_FILE.format(split=split, side=side))
    np.save(out_dir / OFFSETS_FILE.format(split=split), offsets)
    return {
        "pairs": len(sources),
        "source_tokens": int(offsets[-1, 0]),
        "target_tokens": int(offsets[-1, 1]),
    }


def prepare_parallel(
    config, out_dir: str | Path, progress: bool = True, tokenizer: Tokenizer | None = None,
    source_tokenizer: Tokenizer | None = None,
) -> dict[str, Any]:
    """`lmforge prepare` for parallel text (`config` is a `PrepareConfig` with `target` or the
    pair fields set); returns the manifest. Written whole, then renamed into place.

    A given `tokenizer` (a pretrained model's, for fine-tuning) is used as it is; else one joint
    BPE is trained on the training pairs."""
    from lmforge.data.prepare import (
        FORMAT_VERSION,
        MANIFEST_FILE,
        _check_out_dir,
        _version,
        token_dtype,
    )
    from lmforge.tokenizer import train_tokenizer

    out_dir = Path(out_dir)
    _check_out_dir(out_dir)

    def read(source: str, target: str | None) -> list[tuple[str, str]]:
        pairs = read_pairs(
            source, target, config.source_field or "source", config.target_field or "target"
        )
        return list(tqdm(pairs, desc=f"reading {source}", unit=" pairs", disable=not progress))

    pairs = read(config.source, config.target)
    if not pairs:
        raise LmforgeError(f"parallel data {config.source!r} holds no sentence pairs")
    if config.val_source is not None:
        val_pairs = read(config.val_source, config.val_target)
        train_pairs = pairs
    else:
        n_val = round(len(pairs) * config.val_fraction)
        train_pairs, val_pairs = pairs[: len(pairs) - n_val], pairs[len(pairs) - n_val :]
    fingerprint = Fingerprint()
    for src, tgt in pairs:
        fingerprint.update(src + "\t" + tgt)

    if tokenizer is None and config.separate_tokenizers:  # one vocabulary per side
        source_tokenizer = train_tokenizer(
            "bpe", (s for s, _ in train_pairs), config.vocab_size, seq2seq=True, sentinels=config.sentinels
        )
        tokenizer = train_tokenizer(
            "bpe", (t for _, t in train_pairs), config.vocab_size, seq2seq=True, sentinels=config.sentinels
        )
    elif tokenizer is None:  # one joint vocabulary, trained on both sides of the training pairs
        texts = (text for pair in train_pairs for text in pair)
        tokenizer = train_tokenizer(
            "bpe", texts, config.vocab_size, seq2seq=True, sentinels=config.sentinels
        )
    if source_tokenizer is not None and (source_tokenizer.pad_id, source_tokenizer.eos_id) != (
        tokenizer.pad_id, tokenizer.eos_id
    ):
        raise LmforgeError("the source and target tokenizers must agree on the <pad> and </s> ids")
    eos = tokenizer.eos_id
    if eos is None:
        raise LmforgeError("the tokenizer has no end-of-sequence token; sequence pairs need one")
    dtype = token_dtype(tokenizer.vocab_size)
    counts, dropped = {}, {}
    with atomic_dir(out_dir) as tmp:
        for split, split_pairs in (("train", train_pairs), ("val", val_pairs)):
            sources, targets, n_empty, n_long = [], [], 0, 0
            for i in tqdm(range(0, len(split_pairs), _ENCODE_BATCH), desc=f"tokenizing {split}",
                          disable=not progress):
                src_ids, tgt_ids = encode_pairs(
                    tokenizer, split_pairs[i : i + _ENCODE_BATCH], eos, source_tokenizer
                )
                for s, t in zip(src_ids, tgt_ids):
                    if len(s) == 1 or len(t) == 1:  # nothing but </s>: an empty side
                        n_empty += 1
                    elif len(s) > config.max_length or len(t) > config.max_length:
                        n_long += 1
                    else:
                        sources.append(s)
                        targets.append(t)
            counts[split] = write_split(tmp, split, sources, targets, dtype)
            dropped[split] = {"empty": n_empty, "too_long": n_long}
        if counts["train"]["pairs"] == 0:
            raise LmforgeError(
                f"no training pairs left after filtering ({dropped['train']['empty']} empty, "
                f"{dropped['train']['too_long']} longer than max_length={config.max_length} tokens)"
            )
        tokenizer.save(tmp)
        if source_tokenizer is not None:
            source_tokenizer.save(tmp / SOURCE_TOKENIZER_DIR)
        warnings = []
        if counts["val"]["pairs"] == 0:
            warnings.append("no validation pairs: training cannot report val loss or keep a best checkpoint")
        manifest = {
            "format_version": FORMAT_VERSION,
            "format": PARALLEL_FORMAT,
            "source": config.source,
            "target": config.target,
            "val_source": config.val_source,
            "val_target": config.val_target,
            "fields": None if config.target else [config.source_field, config.target_field],
            "source_sha256": fingerprint.hexdigest(),
            "tokenizer": tokenizer.kind,
            "vocab_size": max(tokenizer.vocab_size, (source_tokenizer or tokenizer).vocab_size),
            "separate_tokenizers": source_tokenizer is not None,
            "source_vocab_size": (source_tokenizer or tokenizer).vocab_size,
            "target_vocab_size": tokenizer.vocab_size,
            "eos_id": eos,
            "pad_id": tokenizer.pad_id,
            "dtype": dtype.name,
            "max_length": config.max_length,
            "splits": counts,
            "dropped": dropped,
            "tokens": {s: c["source_tokens"] + c["target_tokens"] for s, c in counts.items()},
            "shards": {},  # token streams are per side here; see the splits
            "val_fraction": config.val_fraction if config.val_source is None else None,
            "warnings": warnings,
            "created_by": f"lmforge {_version()}",
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ---- reading a prepared folder ------------------------------------------------------------------
class ParallelData:
    """A prepared parallel-text folder; `ParallelData.open(path)` (or `lmforge.data.open_data`)."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        from lmforge.data.prepare import DTYPES

        self.path, self.manifest = path, manifest
        self.dtype = DTYPES[manifest["dtype"]]
        self._splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @classmethod
    def open(cls, path: Path, manifest: dict[str, Any]) -> ParallelData:
        for split in SPLITS:
            files = [OFFSETS_FILE.format(split=split)] + [
                SIDE_FILE.format(split=split, side=side) for side in ("source", "target")
            ]
            for name in files:
                if not (path / name).is_file():
                    raise LmforgeError(
                        f"parallel data folder {str(path)!r} is missing {name!r}; prepare it again"
                    )
        return cls(path, manifest)

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        """The target side's tokenizer (the only one, when the vocabulary is joint)."""
        return Tokenizer.load(self.path)

    @functools.cached_property
    def source_tokenizer(self) -> Tokenizer | None:
        """The source side's own tokenizer, or None when the vocabulary is joint."""
        path = self.path / SOURCE_TOKENIZER_DIR
        return Tokenizer.load(path) if path.is_dir() else None

    @property
    def vocab_size(self) -> int:
        """Token ids run below this on both sides (the larger vocabulary when they differ)."""
        return self.manifest["vocab_size"]

    def pairs(self, split: str) -> int:
        check_choice("split", split, SPLITS)
        return self.manifest["splits"][split]["pairs"]

    def tokens(self, split: str) -> int:
        return self.manifest["tokens"].get(split, 0)

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offsets (n + 1, 2), source tokens, target tokens) of a split, memory-mapped."""
        check_choice("split", split, SPLITS)
        if split not in self._splits:
            offsets = np.load(self.path / OFFSETS_FILE.format(split=split), allow_pickle=False)
            sides = []
            for side, column in (("source", 0), ("target", 1)):
                n = int(offsets[-1, column])
                file = self.path / SIDE_FILE.format(split=split, side=side)
                sides.append(np.memmap(file, dtype=self.dtype, mode="r", shape=(n,)) if n else
                             np.zeros(0, dtype=self.dtype))
            self._splits[split] = (offsets, *sides)
        return self._splits[split]

    def lengths(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        offsets = self.split(split)[0]
        return np.diff(offsets[:, 0]), np.diff(offsets[:, 1])

    def pair(self, split: str, i: int) -> tuple[np.ndarray, np.ndarray]:
        offsets, source, target = self.split(split)
        return source[offsets[i, 0] : offsets[i + 1, 0]], target[offsets[i, 1] : offsets[i + 1, 1]]

    def __repr__(self) -> str:
        return f"ParallelData({str(self.path)!r}, vocab_size={self.vocab_size}, " + ", ".join(
            f"{s}={self.pairs(s):,} pairs" for s in SPLITS) + ")"


def seq2seq_batch(
    sources: list[np.ndarray | list[int]], targets: list[np.ndarray | list[int]], pad_id: int,
    decoder_start_id: int,
) -> dict[str, torch.Tensor]:
    """Teacher forcing: the decoder reads [start] + target[:-1] and predicts target; sources and
    targets are right-padded (padded targets carry IGNORE_INDEX, so they cost no loss)."""
    B, S, T = len(sources), max(map(len, sources)), max(map(len, targets))
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, S), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    decoder_input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    for r, (s, t) in enumerate(zip(sources, targets)):
        s, t = torch.as_tensor(np.asarray(s, dtype=np.int64)), torch.as_tensor(np.asarray(t, dtype=np.int64))
        input_ids[r, : len(s)] = s
        attention_mask[r, : len(s)] = 1
        labels[r, : len(t)] = t
        decoder_input_ids[r, 0] = decoder_start_id
        decoder_input_ids[r, 1 : len(t)] = t[:-1]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "decoder_input_ids": decoder_input_ids,
        "labels": labels,
    }


class BucketBatches:
    """Length-grouped batches of `batch_size` pairs, reshuffled every epoch (see the module doc)."""

    def __init__(
        self, data: ParallelData, split: str, batch_size: int, seed: int, pad_id: int,
        decoder_start_id: int,
    ):
        n = data.pairs(split)
        if n == 0:
            raise LmforgeError(f"split {split!r} of {str(data.path)!r} has no sentence pairs")
        self.data, self.split, self.batch_size, self.seed = data, split, batch_size, seed
        self.pad_id, self.decoder_start_id = pad_id, decoder_start_id
        src_len, tgt_len = data.lengths(split)
        self.sort_key = np.maximum(src_len, tgt_len) * 4096 + np.minimum(src_len, tgt_len)
        self.epoch, self.index = 0, 0
        self._order: list[np.ndarray] | None = None

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.sort_key))
        pool = self.batch_size * POOL_BATCHES
        batches = []
        for start in range(0, len(perm), pool):
            chunk = perm[start : start + pool]
            chunk = chunk[np.argsort(self.sort_key[chunk], kind="stable")]
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        return [batches[i] for i in rng.permutation(len(batches))]

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._order is None:
            self._order = self._epoch_batches(self.epoch)
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_batches(self.epoch)
        rows = self._order[self.index]
        self.index += 1
        pairs = [self.data.pair(self.split, int(i)) for i in rows]
        return seq2seq_batch([s for s, _ in pairs], [t for _, t in pairs], self.pad_id, self.decoder_start_id)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None

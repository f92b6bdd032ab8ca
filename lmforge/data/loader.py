"""Reading a prepared data folder: memory-mapped token shards and the batches training draws.

`RandomBatches` draws nanoGPT-style training batches: every row is a window of block_size + 1
consecutive tokens starting at a uniformly random position, so an epoch has no fixed order and
resuming needs only the generator state. `iter_windows` walks a split in order for evaluation.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import check, check_choice
from lmforge.data.prepare import DTYPES, FORMAT_VERSION, MANIFEST_FILE, SPLITS
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer


class TokenData:
    """A prepared data folder (see `lmforge.data.prepare`); open it with `TokenData.open(path)`."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self.dtype = DTYPES[manifest["dtype"]]
        self._maps: dict[str, list[np.ndarray]] = {}  # split -> memory maps, opened on first use

    @classmethod
    def open(cls, path: str | Path) -> TokenData:
        """Open and check DATA_DIR: manifest readable, format known, every shard present and whole."""
        path = Path(path)
        hint = "prepare it with `lmforge prepare --data SRC --out DATA_DIR`"
        if not path.is_dir():
            raise LmforgeError(f"data folder {str(path)!r} does not exist; {hint}")
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise LmforgeError(
                f"{str(path)!r} is not a prepared data folder (no {MANIFEST_FILE}); {hint}"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise LmforgeError(
                f"{str(manifest_path)!r} is not valid JSON ({e}); {hint} again"
            ) from e
        required = ("format_version", "vocab_size", "dtype", "shards", "tokens")
        missing = (
            [k for k in required if k not in manifest]
            if isinstance(manifest, dict)
            else list(required)
        )
        if missing:
            raise LmforgeError(
                f"{str(manifest_path)!r} is not an lmforge data manifest (missing {', '.join(missing)}); {hint} again"
            )
        if manifest.get("format") == "parallel":
            raise LmforgeError(
                f"{str(path)!r} holds parallel text (sentence pairs) for sequence-to-sequence models, "
                "not a token stream; train an encoder-decoder on it (e.g. --preset transformer-tiny)"
            )
        version = manifest["format_version"]
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise LmforgeError(
                f"data folder {str(path)!r} has format version {version!r}, but this lmforge reads versions up to "
                f"{FORMAT_VERSION}; upgrade lmforge or prepare the data again"
            )
        if manifest["dtype"] not in DTYPES:
            raise LmforgeError(
                f"{str(manifest_path)!r}: dtype {manifest['dtype']!r} is not one of {', '.join(DTYPES)}"
            )
        itemsize = DTYPES[manifest["dtype"]].itemsize
        for split in SPLITS:
            for shard in manifest["shards"].get(split, []):
                file = path / shard["file"]
                if not file.is_file():
                    raise LmforgeError(
                        f"data folder {str(path)!r} is missing shard {shard['file']!r}; {hint} again"
                    )
                if file.stat().st_size != shard["tokens"] * itemsize:
                    raise LmforgeError(
                        f"shard {str(file)!r} has {file.stat().st_size} bytes, expected {shard['tokens']} tokens "
                        f"x {itemsize} bytes; the folder is damaged, {hint} again"
                    )
        for entry in manifest.get("sentences", {}).values():
            for key in ("sentences_file", "documents_file"):
                if not (path / entry[key]).is_file():
                    raise LmforgeError(
                        f"data folder {str(path)!r} is missing {entry[key]!r}; {hint} again"
                    )
        return cls(path, manifest)

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.path)

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    def tokens(self, split: str) -> int:
        check_choice("split", split, SPLITS)
        return self.manifest["tokens"].get(split, 0)

    def shards(self, split: str) -> list[np.ndarray]:
        """The split's shards as read-only memory maps, in stream order."""
        check_choice("split", split, SPLITS)
        if split not in self._maps:
            self._maps[split] = [
                np.memmap(
                    self.path / shard["file"], dtype=self.dtype, mode="r", shape=(shard["tokens"],)
                )
                for shard in self.manifest["shards"].get(split, [])
                if shard["tokens"] > 0  # an empty file cannot be memory-mapped
            ]
        return self._maps[split]

    @property
    def has_sentences(self) -> bool:
        """Whether the folder keeps sentence and document boundaries (WordPiece data, for BERT)."""
        return "sentences" in self.manifest

    def sentence_index(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(sentence starts, document starts) of a split, each with a final end entry: sentence i
        is tokens [s[i], s[i + 1]) of the split's stream, document j is sentences [d[j], d[j + 1])."""
        check_choice("split", split, SPLITS)
        if not self.has_sentences:
            raise LmforgeError(
                f"data folder {str(self.path)!r} ({self.manifest.get('tokenizer')} tokenizer) has no "
                "sentence index; BERT pretraining needs data prepared with --tokenizer wordpiece"
            )
        entry = self.manifest["sentences"][split]
        return (
            np.load(self.path / entry["sentences_file"], allow_pickle=False),
            np.load(self.path / entry["documents_file"], allow_pickle=False),
        )

    def stream(self, split: str) -> _Concatenated:
        """The split's shards read as one array (`len()` and `.read(start, stop)`)."""
        return _Concatenated(self.shards(split))

    def __repr__(self) -> str:
        tokens = ", ".join(f"{s}={self.tokens(s):,}" for s in SPLITS)
        return f"TokenData({str(self.path)!r}, {self.manifest.get('tokenizer')}, vocab_size={self.vocab_size}, {tokens})"


def open_data(path: str | Path):
    """A prepared data folder: a `TokenData` (one token stream) or, for sentence pairs, a
    `lmforge.data.parallel.ParallelData`."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict) and manifest.get("format") == "parallel":
        from lmforge.data.parallel import ParallelData

        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise LmforgeError(
                f"data folder {str(path)!r} has format version {version!r}, but this lmforge reads "
                f"versions up to {FORMAT_VERSION}; upgrade lmforge or prepare the data again"
            )
        return ParallelData.open(path, manifest)
    return TokenData.open(path)


class RandomBatches:
    """Random windows of `block_size + 1` tokens, each inside one shard; deterministic per seed.

    Drawing a start uniformly over all valid positions of all shards picks each shard with
    probability proportional to its usable length (its tokens minus block_size).
    """

    def __init__(self, data: TokenData, split: str, batch_size: int, block_size: int, seed: int):
        check(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        check(block_size >= 1, f"block_size must be >= 1, got {block_size}")
        self.split, self.batch_size, self.block_size = split, batch_size, block_size
        self.shards = [s for s in data.shards(split) if len(s) > block_size]
        n_tokens = data.tokens(split)
        if not self.shards:
            if (
                n_tokens > block_size
            ):  # enough tokens in all, but cut into shards that are too short
                raise LmforgeError(
                    f"split {split!r} has {n_tokens} tokens but no shard holds context+1 = {block_size + 1} of them; "
                    "use a smaller block_size or prepare with a larger shard_tokens"
                )
            raise LmforgeError(
                f"split {split!r} has {n_tokens} tokens, fewer than context+1 = {block_size + 1}; "
                "use a smaller block_size or more data"
            )
        # starts[i] = number of valid window starts in shards[:i]
        usable = [len(s) - block_size for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(usable)])
        self.generator = torch.Generator().manual_seed(seed)  # never the global RNG
        self.batches_drawn = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both int64 (batch_size, block_size), y[:, t] the token after x[:, t]."""
        positions = torch.randint(
            int(self.starts[-1]), (self.batch_size,), generator=self.generator
        ).numpy()
        shard_index = np.searchsorted(self.starts, positions, side="right") - 1
        rows = [
            self.shards[i][p - self.starts[i] : p - self.starts[i] + self.block_size + 1]
            for i, p in zip(shard_index, positions)
        ]
        windows = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T+1)
        self.batches_drawn += 1
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        """Enough to continue the exact sequence of batches (saved inside training checkpoints)."""
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])


def iter_windows(
    data_or_tokens: TokenData | np.ndarray | torch.Tensor | Sequence[int],
    block_size: int,
    split: str = "val",
    batch_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows over a whole split (or a token array) for an exact full-split loss.

    Windows overlap by one token so every token after the first is a target exactly once: window
    k holds tokens [k*T, k*T + T] and predicts tokens k*T+1 .. k*T+T (T = block_size). Batches are
    (x, y) int64 of shape (b, T), b <= batch_size; the final window may be shorter than T and comes
    alone, so weight each batch's mean loss by `y.numel()`.
    """
    check(block_size >= 1, f"block_size must be >= 1, got {block_size}")
    check(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
    if isinstance(data_or_tokens, TokenData):
        shards, name = data_or_tokens.shards(split), f"split {split!r}"
    else:
        shards, name = [np.asarray(data_or_tokens)], "the token array"
    stream = _Concatenated(shards)
    if len(stream) < 2:
        raise LmforgeError(f"{name} has {len(stream)} tokens; evaluation needs at least 2")
    n_targets = len(stream) - 1
    full = n_targets // block_size  # windows with a whole block of targets
    for first in range(0, full, batch_size):
        rows = [
            stream.read(k * block_size, k * block_size + block_size + 1)
            for k in range(first, min(first + batch_size, full))
        ]
        windows = torch.from_numpy(np.stack(rows).astype(np.int64))
        yield windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    if n_targets % block_size:
        window = torch.from_numpy(stream.read(full * block_size, len(stream)).astype(np.int64))[
            None
        ]
        yield window[:, :-1].contiguous(), window[:, 1:].contiguous()


class _Concatenated:
    """Read ranges across shards as if they were one array (shards split a single stream)."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in shards])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        parts = []
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            shard, base = self.shards[i], int(self.offsets[i])
            end = min(stop, base + len(shard))
            parts.append(shard[start - base : end - base])
            start, i = end, i + 1
        return np.concatenate(parts)

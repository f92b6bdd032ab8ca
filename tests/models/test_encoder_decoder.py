import pytest
import torch

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.errors import LmforgeError
from lmforge.models import ENCDEC_PRESETS, EncoderDecoder, EncoderDecoderConfig
from lmforge.nn import relative_position_bucket
from lmforge.tokenizer import train_tokenizer
from tests.conftest import SAMPLE_TEXT

T5 = dict(
    norm="rmsnorm", norm_position="pre", norm_eps=1e-6, bias=False, position="relative",
    scale_embeddings=False, scale_attn=False, scale_decoder_output=True,
    relative_buckets=8, relative_max_distance=20,  # few buckets: short inputs reach the log-spaced ones
)
VARIANTS = {
    "transformer": dict(),  # post-LN, sinusoids, ReLU, shared and tied embeddings
    "learned-pre-gqa": dict(position="learned", norm_position="pre", n_kv_head=1, activation="gelu"),
    "separate-untied": dict(share_embeddings=False, tie_embeddings=False, n_decoder_layer=3),
    "t5-v1.0": T5,
    "t5-v1.1": {**T5, "activation": "geglu", "tie_embeddings": False, "scale_decoder_output": False, "head_size": 8},
}


def tiny_encdec(vocab_size: int = 50, **overrides) -> EncoderDecoder:
    config = dict(n_layer=2, n_head=2, n_embd=32, mlp_hidden=64, max_position=32, vocab_size=vocab_size, dropout=0.0)
    return EncoderDecoder(EncoderDecoderConfig(**{**config, **overrides})).eval()


def batch(vocab_size: int = 50):
    """Two sources, the second right-padded after 5 tokens; two targets starting with token 0."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(2, vocab_size, (2, 9), generator=g)
    src_mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    src[1, 5:] = 0
    tgt = torch.randint(2, vocab_size, (2, 7), generator=g)
    tgt[:, 0] = 0
    return src, src_mask, tgt


@pytest.mark.parametrize("name", ENCDEC_PRESETS)
def test_presets_build(name):
    model = EncoderDecoder(EncoderDecoderConfig(vocab_size=100, **ENCDEC_PRESETS[name]))
    c = model.config
    assert c.n_decoder_layer == c.n_layer
    if name.startswith("t5"):
        assert (c.position, c.norm, c.norm_position, c.bias, c.scale_attn) == ("relative", "rmsnorm", "pre", False, False)
        assert model.encoder.rel_bias is not None and model.decoder.rel_bias is not None
    else:
        assert (c.position, c.norm_position, c.activation) == ("sinusoidal", "post", "relu")
        assert model.encoder.ln_f is None
    assert model.lm_head.weight is model.decoder.wte.weight is model.encoder.wte.weight
    if name == "transformer-tiny":
        assert (c.n_layer, c.n_embd, c.n_head, c.mlp_hidden) == (3, 256, 4, 1024)


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_output_projection(variant):
    model = tiny_encdec(**VARIANTS[variant])
    src, src_mask, tgt = batch()
    logits = model(src, src_mask, decoder_input_ids=tgt)
    assert logits.shape == (2, 7, 50)
    assert model.encode(src, src_mask).shape == (2, 9, 32)
    c = model.config
    assert (model.lm_head.weight is model.decoder.wte.weight) == c.tie_embeddings
    assert (model.encoder.wte is model.decoder.wte) == c.share_embeddings
    assert len(model.decoder.h) == c.n_decoder_layer


@pytest.mark.parametrize("variant", VARIANTS)
def test_source_padding_does_not_change_other_rows_or_results(variant):
    model = tiny_encdec(**VARIANTS[variant])
    src, src_mask, tgt = batch()
    with torch.no_grad():
        full = model(src, src_mask, decoder_input_ids=tgt)
        alone = model(src[1:, :5], decoder_input_ids=tgt[1:])  # the padded row without its padding
        first = model(src[:1], decoder_input_ids=tgt[:1])
        other_pad = src.clone()
        other_pad[1, 5:] = 7  # what stands in the padding must not matter
        repadded = model(other_pad, src_mask, decoder_input_ids=tgt)
    assert torch.allclose(full[1:], alone, atol=1e-5)
    assert torch.allclose(full[:1], first, atol=1e-5)
    assert torch.allclose(full, repadded, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoder_is_causal(variant):
    model = tiny_encdec(**VARIANTS[variant])
    src, src_mask, tgt = batch()
    changed = tgt.clone()
    changed[:, 4:] = torch.randint(2, 50, (2, 3))
    with torch.no_grad():
        a = model(src, src_mask, decoder_input_ids=tgt)
        b = model(src, src_mask, decoder_input_ids=changed)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert not torch.allclose(a[:, 4:], b[:, 4:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_incremental_decoding_matches_full_forward(variant):
    model = tiny_encdec(**VARIANTS[variant])
    src, src_mask, tgt = batch()
    with torch.no_grad():
        full = model(src, src_mask, decoder_input_ids=tgt)
        encoder_out = model.encode(src, src_mask)
        cross = model.cross_kv(encoder_out)  # once per source
        cache = model.new_kv_cache(2, max_len=16)
        steps = [model.decode(tgt[:, :3], encoder_mask=src_mask, kv_cache=cache, cross_kv=cross)]
        for t in range(3, 7):
            steps.append(model.decode(tgt[:, t : t + 1], encoder_mask=src_mask, kv_cache=cache, cross_kv=cross))
        last = model.decode(tgt, encoder_out, src_mask, last_only=True)  # cross K/V computed inside
    assert cache.pos == 7
    assert torch.allclose(full, torch.cat(steps, dim=1), atol=1e-5)
    assert torch.allclose(full[:, -1:], last, atol=1e-5)


@pytest.mark.parametrize("variant", ["transformer", "t5-v1.0"])
def test_target_padding_does_not_change_real_positions(variant):
    model = tiny_encdec(**VARIANTS[variant])
    src, src_mask, tgt = batch()
    tgt_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        padded = model(src, src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask)
        alone = model(src[1:, :5], decoder_input_ids=tgt[1:, :4])
    assert torch.isfinite(padded).all()
    assert torch.allclose(padded[1:, :4], alone, atol=1e-5)


def test_cross_kv_reorder_follows_the_batch():
    model = tiny_encdec()
    src, src_mask, tgt = batch()
    with torch.no_grad():
        cross = model.cross_kv(model.encode(src, src_mask))
        cross.reorder(torch.tensor([1, 1]))
        mask = src_mask[[1, 1]]
        got = model.decode(tgt[[1, 1]], encoder_mask=mask, cross_kv=cross)
        expected = model(src[[1, 1]], mask, decoder_input_ids=tgt[[1, 1]])
    assert torch.allclose(got, expected, atol=1e-6)


def test_relative_position_buckets():
    offsets = torch.tensor([-1000, -128, -127, -16, -15, -8, -7, -1, 0, 1, 7, 8, 100])
    causal = relative_position_bucket(offsets, bidirectional=False, n_buckets=32, max_distance=128)
    # 16 exact distances, then log-spaced up to 128; keys after the query all share bucket 0
    assert causal.tolist() == [31, 31, 31, 16, 15, 8, 7, 1, 0, 0, 0, 0, 0]
    both = relative_position_bucket(offsets, bidirectional=True, n_buckets=32, max_distance=128)
    # 16 buckets a direction: 8 exact, 8 log-spaced; keys after the query from bucket 16 on
    assert both.tolist() == [15, 15, 15, 10, 9, 8, 7, 1, 0, 17, 23, 24, 31]


def test_gradients_reach_every_parameter_in_training_mode():
    model = tiny_encdec(**{**T5, "dropout": 0.1, "activation_dropout": 0.1}).train()
    src, src_mask, tgt = batch()
    logits = model(src, src_mask, decoder_input_ids=tgt)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.roll(-1, 1).flatten()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_save_load_roundtrip(tmp_path):
    tokenizer = train_tokenizer("char", [SAMPLE_TEXT])
    model = tiny_encdec(tokenizer.vocab_size, **VARIANTS["t5-v1.1"])
    save_checkpoint(tmp_path, model, tokenizer)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.meta["model_type"] == "encoder-decoder"
    assert isinstance(ckpt.model, EncoderDecoder) and ckpt.model.config == model.config
    src, src_mask, tgt = batch(tokenizer.vocab_size)
    with torch.no_grad():
        assert torch.equal(ckpt.model(src, src_mask, decoder_input_ids=tgt), model(src, src_mask, decoder_input_ids=tgt))


def test_param_count_and_flops():
    model = tiny_encdec(position="learned")
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(matmul_only=False) == total
    # two learned position tables are lookups; the shared token table is also the tied lm_head
    assert model.num_params() == total - 2 * 32 * 32
    assert model.flops_per_token(16) == 6 * model.num_params() + 12 * 32 * 16 * (2 + 2 * 2)
    untied = tiny_encdec(share_embeddings=False, tie_embeddings=False, position="relative")
    tables = 2 * 50 * 32 + 2 * 32 * 2  # two token tables, two relative bias tables (32 buckets x 2 heads)
    assert untied.num_params() == untied.num_params(matmul_only=False) - tables


def test_absolute_positions_limit_the_length():
    model = tiny_encdec(max_position=8)
    with pytest.raises(ValueError, match="longer than the model's 8 positions"):
        model(torch.zeros(1, 9, dtype=torch.long), decoder_input_ids=torch.zeros(1, 2, dtype=torch.long))
    relative = tiny_encdec(max_position=8, position="relative")
    assert relative(torch.zeros(1, 9, dtype=torch.long), decoder_input_ids=torch.zeros(1, 12, dtype=torch.long)).shape == (1, 12, 50)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(position="rotary"), "position='rotary' is not valid; choose one of 'learned', 'sinusoidal', 'relative'"),
        (dict(n_decoder_layer=0), "n_decoder_layer must be >= 1"),
        (dict(n_embd=30, n_head=4), "n_embd=30 must be divisible by n_head=4"),
        (dict(head_size=0), "head_size must be >= 1"),
        (dict(position="relative", relative_buckets=2), "relative_buckets must be >= 4"),
        (dict(position="relative", relative_max_distance=16), "relative_max_distance=16 must be > relative_buckets // 2 = 16"),
        (dict(decoder_start_token_id=50), r"decoder_start_token_id must be in \[0, vocab_size=50\)"),
        (dict(eos_token_id=-1), "eos_token_id must be in"),
        (dict(activation_dropout=1.0), "activation_dropout must be in"),
        (dict(activation="tanh"), "activation='tanh' is not valid"),
    ],
)
def test_invalid_config_names_the_field(kwargs, message):
    with pytest.raises(LmforgeError, match=message):
        EncoderDecoderConfig(vocab_size=50, **kwargs)


def test_head_size_apart_from_width():
    c = EncoderDecoderConfig(vocab_size=50, n_embd=30, n_head=4, head_size=8)  # T5 v1.1 small-style
    model = EncoderDecoder(c)
    assert c.head_dim == 8 and model.encoder.h[0].attn.c_attn.weight.shape == (3 * 32, 30)

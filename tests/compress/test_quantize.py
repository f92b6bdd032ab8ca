"""Quantization: each quantized layer within half a quantization step of the float weights and
equal to dequantize-then-matmul (so the CPU kernels are pinned); whole models close to float;
checkpoints that round-trip bit for bit, smaller; and the errors a user can cause."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.compress import quantize, quantize_checkpoint
from lmforge.compress.quantize import (
    QUANTIZED_LINEAR,
    Int4WeightLinear,
    Int8DynamicLinear,
    plan,
    refuse_quantized,
)
from lmforge.errors import LmforgeError
from lmforge.generate import GenerationConfig, generate
from lmforge.interop import convert
from lmforge.models import GPT, Bert, BertConfig, EncoderDecoder, EncoderDecoderConfig, GPTConfig
from lmforge.tokenizer import train_tokenizer
from tests.conftest import SAMPLE_TEXT

SCHEMES = [("int8-weight", None), ("int8-dynamic", None), ("int4-weight", 32)]
GROUP = 32


def random_linear(n_out: int = 96, n_in: int = 128, bias: bool = True) -> torch.nn.Linear:
    linear = torch.nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05)
        linear.weight[3, 7] = 0.6  # an outlier: its row's (group's) step is large
        linear.weight[5] = 0.0  # an all-zero row must not divide by zero
        if bias:
            linear.bias.normal_(0, 0.1)
    return linear


def quantized(scheme: str, linear: torch.nn.Linear) -> torch.nn.Module:
    return QUANTIZED_LINEAR[scheme].from_linear(linear, GROUP if scheme == "int4-weight" else None)


def step_of(module) -> torch.Tensor:
    """The quantization step of every weight, (N, K)."""
    if isinstance(module, Int4WeightLinear):
        return module.scales.float().repeat_interleave(module.group_size, dim=1)
    return module.scales.float()[:, None].expand(module.out_features, module.in_features)


# ---- one layer -------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_weights_within_half_a_step(scheme, group):
    linear = random_linear()
    module = quantized(scheme, linear)
    error = (module.dequantize() - linear.weight).abs()
    assert (error <= step_of(module) * 0.5 * (1 + 1e-5) + 1e-9).all(), (error / step_of(module)).max()
    assert module.dequantize()[5].abs().max() < 1e-6  # the zero row stays (nearly) zero
    levels = 15 if scheme == "int4-weight" else 254  # the grid is used, not collapsed onto few values
    assert module.qweight.unique().numel() > min(levels, 100) // 2


def int4_reference_weight(module: Int4WeightLinear) -> torch.Tensor:
    """Dequantized int4 weights from the stored tensors, written out independently of the module."""
    packed = module.qweight.to(torch.int32)
    q = torch.empty(module.out_features, module.in_features)
    q[:, 0::2], q[:, 1::2] = (packed & 15).float(), (packed >> 4).float()
    scale = module.scales.float().repeat_interleave(module.group_size, dim=1)
    zero = module.zeros.float().repeat_interleave(module.group_size, dim=1)
    return (q - 8) * scale + zero


def reference_output(module, x: torch.Tensor) -> torch.Tensor:
    """Dequantize, then matmul, as each scheme defines it (bias added in float)."""
    if isinstance(module, Int8DynamicLinear):
        x_scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
        xq = (x / x_scale).round().clamp(-127, 127)
        y = (xq @ module.qweight.float().T) * x_scale * module.scales
    else:  # weight-only: bf16 activations, fp32 sums, rounded to bf16
        w = int4_reference_weight(module) if isinstance(module, Int4WeightLinear) else (
            module.qweight.float() * module.scales.float()[:, None])
        y = F.linear(x.bfloat16().float(), w).bfloat16().float()
    return y + module.bias


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_kernel_output_is_dequantize_then_matmul(scheme, group, monkeypatch):
    linear = random_linear()
    module = quantized(scheme, linear)
    calls = []
    kernel = getattr(torch, module.kernel)
    monkeypatch.setattr(torch, module.kernel, lambda *a: calls.append(1) or kernel(*a))
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        y, expected = module(x), reference_output(module, x.view(15, 128)).view(3, 5, 96)
    assert calls, f"{module.kernel} was not called"
    assert y.shape == (3, 5, 96) and y.dtype == torch.float32
    # the same numbers, up to the rare last-bit flip of summing in another order
    ulp = expected.abs() * 2**-7 + 1e-6
    assert ((y - expected).abs() <= ulp).all()
    assert ((y - expected).abs() <= 1e-6).float().mean() > 0.98
    torch.testing.assert_close(module.reference_forward(x), y, rtol=2**-7, atol=1e-5)


@pytest.mark.parametrize("scheme,group,bound", [(*SCHEMES[0], 0.02), (*SCHEMES[1], 0.02), (*SCHEMES[2], 0.10)])
def test_output_close_to_float(scheme, group, bound):
    linear = random_linear(n_out=256, n_in=256)
    module = quantized(scheme, linear)
    x = torch.randn(16, 256)
    with torch.no_grad():
        y, y_float = module(x), linear(x)
    assert (y - y_float).norm() / y_float.norm() < bound


def test_bf16_input_and_no_bias():
    linear = random_linear(bias=False)
    for scheme, _ in SCHEMES:
        module = quantized(scheme, linear)
        x = torch.randn(4, 128, dtype=torch.bfloat16)
        y = module(x)
        assert y.dtype == torch.bfloat16 and module.bias is None
        assert (y.float() - linear(x.float())).norm() / linear(x.float()).norm() < 0.1


def test_int4_layout_is_rebuilt_when_the_weights_change():
    a, b = quantized("int4-weight", random_linear()), quantized("int4-weight", random_linear())
    x = torch.randn(2, 128)
    a(x)  # builds the kernel layout from a's weights
    with torch.no_grad():
        for name in ("qweight", "scales", "zeros", "bias"):
            getattr(a, name).copy_(getattr(b, name))  # as load_checkpoint's strict copy does
    assert torch.equal(a(x), b(x))


# ---- whole models ----------------------------------------------------------------------------
V = 35  # the char tokenizer's vocabulary of SAMPLE_TEXT
SMALL = dict(n_layer=2, n_head=2, n_embd=64, dropout=0.0)
IDS = torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(0))


def make(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt":
        return GPT(GPTConfig(vocab_size=V, block_size=32, **SMALL)).eval()
    if kind == "gpt-modern":  # untied head of 35 outputs: int4 keeps it float (not a multiple of 16)
        return GPT(GPTConfig(vocab_size=V, block_size=32, n_kv_head=1, norm="rmsnorm", position="rotary",
                             activation="swiglu", bias=False, tie_embeddings=False, **SMALL)).eval()
    if kind == "bert":
        return Bert(BertConfig(vocab_size=V, max_position=32, head="mlm", pooler=True, **SMALL)).eval()
    return EncoderDecoder(EncoderDecoderConfig(vocab_size=V, max_position=32, **SMALL)).eval()


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, GPT):
            return model(IDS)
        if isinstance(model, Bert):
            return model(IDS, torch.ones_like(IDS)).mlm_logits
        return model(IDS, torch.ones_like(IDS), decoder_input_ids=IDS)


KINDS = ("gpt", "gpt-modern", "bert", "encoder-decoder")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_model_close_to_float_and_round_trip(kind, scheme, group, tmp_path, char_tokenizer):
    model = make(kind)
    expected = outputs(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    summary = quantize(model, scheme, group, include_head=True)
    got = outputs(model)
    bound = 0.25 if scheme == "int4-weight" else 0.03  # random weights: no outliers to protect
    assert (got - expected).norm() / expected.norm() < bound
    assert sorted(summary.quantized + list(summary.kept_float)) == sorted(linears)

    save_checkpoint(tmp_path / "q", model, char_tokenizer)
    meta = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert meta == {"scheme": scheme, "group_size": group, "modules": summary.quantized}
    stored = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert not any(f"{name}.weight" in stored for name in summary.quantized)  # no float copies
    loaded = load_checkpoint(tmp_path / "q").model
    assert torch.equal(outputs(loaded), got)


def test_what_stays_float():
    _, kept = plan(make("encoder-decoder"), "int8-weight", None)
    assert "tied to the token embedding" in kept["lm_head"]
    assert "cross-attention" in kept["decoder.h.0.cross_attn.c_attn"]
    targets, kept = plan(make("bert"), "int8-weight", None)
    assert "outside the Transformer blocks" in kept["pooler"] and "pooler" not in targets
    targets, _ = plan(make("bert"), "int8-weight", None, include_head=True)
    assert {"pooler", "mlm.dense"} <= set(targets)
    targets, kept = plan(make("gpt-modern"), "int4-weight", 32, include_head=True)
    assert "not a multiple of 16" in kept["lm_head"]
    model = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=64, mlp_hidden=80))
    _, kept = plan(model, "int4-weight", 64)
    assert "in_features=80 is not a multiple of the int4 group size 64" in kept["transformer.h.0.mlp.c_proj"]


@pytest.mark.parametrize("scheme,group,ratio", [("int8-weight", None, 0.27), ("int4-weight", 32, 0.17)])
def test_checkpoint_is_smaller(scheme, group, ratio, tmp_path, char_tokenizer):
    model = make("gpt")
    save_checkpoint(tmp_path / "float", model, char_tokenizer)
    summary = quantize_checkpoint(tmp_path / "float", tmp_path / "q", scheme, group)
    # int8: 1 of 4 bytes per weight (+ a bf16 scale per row, fp32 biases); int4: 1/2 byte + scales
    assert summary.layer_bytes[1] / summary.layer_bytes[0] < ratio
    assert summary.file_bytes[1] < summary.file_bytes[0] * 0.55  # the float embedding is left
    assert summary.file_bytes[1] == (tmp_path / "q" / "model.safetensors").stat().st_size
    assert "quantized 8 Linear layers" in str(summary) and "lm_head: tied" in str(summary)


# ---- a trained model -------------------------------------------------------------------------
def train_tiny_gpt():
    """A tiny GPT trained on SAMPLE_TEXT until its greedy continuations are not near-ties; with
    its char tokenizer and the text's token ids."""
    tokenizer = train_tokenizer("char", [SAMPLE_TEXT])
    ids = torch.tensor(tokenizer.encode(SAMPLE_TEXT))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        start = torch.randint(0, len(ids) - 33, (16,))
        batch = torch.stack([ids[s : s + 33] for s in start])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer, ids


@pytest.fixture(scope="module")
def trained():
    return train_tiny_gpt()


PROMPTS = ["The quick", "Pack my box", "How vexingly", "A model learns", "jumps over the"]


@pytest.mark.parametrize("scheme,group,agree,same", [(*SCHEMES[0], 0.97, 4), (*SCHEMES[1], 0.97, 4),
                                                     (*SCHEMES[2], 0.9, 3)])
def test_trained_model_predicts_and_generates_like_float(trained, scheme, group, agree, same):
    model, tokenizer, ids = trained
    quantized_model = GPT(model.config).eval()
    quantized_model.load_state_dict(model.state_dict())
    quantize(quantized_model, scheme, group)
    window = ids[:256].view(8, 32)
    with torch.no_grad():
        top, top_q = model(window).argmax(-1), quantized_model(window).argmax(-1)
    assert (top == top_q).float().mean() >= agree
    config = GenerationConfig(max_new_tokens=20, do_sample=False)
    texts = [r.text for r in generate(model, tokenizer, PROMPTS, config)]
    texts_q = [r.text for r in generate(quantized_model, tokenizer, PROMPTS, config)]
    assert sum(a == b for a, b in zip(texts, texts_q)) >= same, (texts, texts_q)


# ---- errors ----------------------------------------------------------------------------------
def test_errors(tmp_path, char_tokenizer):
    with pytest.raises(LmforgeError, match="unknown quantization scheme 'int3'; choose one of int8-weight"):
        quantize(make("gpt"), "int3")
    with pytest.raises(LmforgeError, match="--group-size applies to int4-weight only"):
        quantize(make("gpt"), "int8-weight", 32)
    with pytest.raises(LmforgeError, match="int4 group size must be one of 32, 64, 128, 256"):
        quantize(make("gpt"), "int4-weight", 48)
    narrow = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=48))
    with pytest.raises(LmforgeError, match=r"with group size 128: in_features are \[48, 192\]"):
        quantize(narrow, "int4-weight")  # the default group divides none of these layers
    model = make("gpt")
    quantize(model, "int8-dynamic")
    with pytest.raises(LmforgeError, match=r"already quantized \(int8-dynamic, 8 layers\)"):
        quantize(model, "int4-weight", 32)
    with pytest.raises(LmforgeError, match="cannot train a quantized model"):
        refuse_quantized(model, "train")
    save_checkpoint(tmp_path / "q", model, char_tokenizer)
    with pytest.raises(LmforgeError, match="is already quantized"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "qq", "int8-weight")
    with pytest.raises(LmforgeError, match="Hugging Face folders hold float weights"):
        convert(tmp_path / "q", tmp_path / "hf")
    meta = json.loads((tmp_path / "q" / "config.json").read_text())
    meta["quantization"]["modules"].append("transformer.h.9.attn.c_attn")
    (tmp_path / "q" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(LmforgeError, match="'transformer.h.9.attn.c_attn' is not a Linear layer"):
        load_checkpoint(tmp_path / "q")


def test_training_from_a_quantized_model_is_refused(tmp_path, char_tokenizer):
    from lmforge.data import PrepareConfig, prepare
    from lmforge.train import DataConfig, TrainConfig, train

    (tmp_path / "corpus.txt").write_text(SAMPLE_TEXT)
    prepare(PrepareConfig(source=str(tmp_path / "corpus.txt"), tokenizer="char"), tmp_path / "data", progress=False)
    model = make("gpt")
    quantize(model, "int8-weight")
    with pytest.raises(LmforgeError, match="cannot train a quantized model .* train the float checkpoint"):
        train(model.config, TrainConfig(max_iters=1, device="cpu"), DataConfig(str(tmp_path / "data")),
              tmp_path / "run", init_model=model, progress=False)


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_served_like_offline(trained, scheme, group):
    """The continuous-batching server runs a quantized model as it runs a float one: every request
    gets the tokens offline `generate` gives it, whatever it is batched with."""
    from lmforge.serve import Engine

    model, tokenizer, _ = trained
    quantized_model = GPT(model.config).eval()
    quantized_model.load_state_dict(model.state_dict())
    quantize(quantized_model, scheme, group)
    configs = [GenerationConfig(do_sample=False, max_new_tokens=12), GenerationConfig(seed=1, max_new_tokens=9)]
    with Engine(quantized_model, tokenizer, max_batch_size=4) as engine:
        handles = [(p, c, engine.submit(tokenizer.encode(p), c, lambda event: None))
                   for p in PROMPTS for c in configs]
        for prompt, config, handle in handles:
            assert handle.wait(60)
            assert handle.token_ids == generate(quantized_model, tokenizer, prompt, config)[0].token_ids

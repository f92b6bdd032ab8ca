"""Faster decoding: the static-shape decode step computes what the default step does (eagerly at
every step, compiled once on a 1-layer model), and bf16 decoding runs and mostly agrees."""

from __future__ import annotations

import shutil

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.generate import GenerationConfig, fast, generate_ids, inference_dtype
from lmforge.generate.engine import _left_padded, _next_logits
from tests.conftest import tiny_gpt

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4]]
MODELS = {
    "learned": {},
    "rotary-gqa": dict(position="rotary", n_kv_head=1, norm="rmsnorm", activation="swiglu", bias=False),
    "sinusoidal-post-norm": dict(position="sinusoidal", norm_position="post"),
}


@pytest.mark.parametrize("kind", MODELS)
def test_static_step_matches_the_default_step(kind):
    """Same logits at every step of a left-padded batch, each path with its own cache."""
    model = tiny_gpt(64, **MODELS[kind])
    new = 10
    L = max(map(len, PROMPTS))
    tokens = _left_padded(PROMPTS, L + new, "cpu")
    default_cache, static_cache = model.new_kv_cache(3, L + new), model.new_kv_cache(3, L + new)
    with torch.inference_mode():
        logits = _next_logits(model, tokens[:, :L], True, default_cache)
        _next_logits(model, tokens[:, :L], True, static_cache)
        for t in range(L + 1, L + new + 1):
            tokens[:, t - 1] = logits.argmax(dim=-1)
            logits = _next_logits(model, tokens[:, :t], True, default_cache)
            static = fast.static_decode_step(model, static_cache, tokens, t, compiled=False)
            torch.testing.assert_close(static, logits, rtol=1e-5, atol=1e-5)
            assert static_cache.pos == default_cache.pos == t


@pytest.fixture
def eager_static_step(monkeypatch):
    """`compile=True` decoding with the static step left uncompiled."""
    monkeypatch.setattr(fast, "_compiled_step", lambda: fast._static_step)


@pytest.mark.parametrize("kind", MODELS)
def test_static_path_gives_the_same_tokens(kind, eager_static_step):
    model = tiny_gpt(64, **MODELS[kind])
    for config in (dict(do_sample=False), dict(do_sample=True, seed=3, top_k=10, num_return_sequences=2)):
        expected = generate_ids(model, PROMPTS, GenerationConfig(max_new_tokens=12, **config))
        assert generate_ids(model, PROMPTS, GenerationConfig(max_new_tokens=12, compile=True, **config)) == expected


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("c++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_compiled_decoding_gives_the_same_tokens():
    model = tiny_gpt(64, n_layer=1)
    config = GenerationConfig(max_new_tokens=6, do_sample=False)
    expected = generate_ids(model, PROMPTS, config)
    compiled = GenerationConfig(max_new_tokens=6, do_sample=False, compile=True)
    assert generate_ids(model, PROMPTS, compiled) == expected
    assert generate_ids(model, PROMPTS, compiled) == expected  # the compiled graph, reused


@pytest.mark.parametrize(
    "config, message",
    [(dict(num_beams=2, do_sample=False), "num_beams=1"), (dict(use_cache=False), "use_cache=True")],
)
def test_compile_needs_the_cached_one_token_step(config, message):
    with pytest.raises(LmforgeError, match=message):
        GenerationConfig(compile=True, **config)


def test_bf16_decoding_runs_and_mostly_agrees():
    model = tiny_gpt(64, block_size=64)
    config = GenerationConfig(max_new_tokens=40, do_sample=False)
    fp32 = generate_ids(model, PROMPTS, config)
    bf16_model = tiny_gpt(64, block_size=64)
    bf16_model.load_state_dict(model.state_dict())
    bf16_model.to(torch.bfloat16)
    assert bf16_model.new_kv_cache(1).k.dtype == torch.bfloat16
    bf16 = generate_ids(bf16_model, PROMPTS, config)
    assert all(len(ids) == 40 for ids in bf16)
    # bf16 rounding may flip a near-tie, after which the texts part; fed the same tokens, the
    # two models' choices agree almost everywhere
    ids = torch.tensor([PROMPTS[1] + fp32[1]])
    with torch.inference_mode():
        agree = (model(ids).argmax(-1) == bf16_model(ids).argmax(-1)).float().mean().item()
    assert agree >= 0.9
    assert bf16[0][:3] == fp32[0][:3]


def test_inference_dtype():
    assert inference_dtype("fp32", "cpu") == torch.float32
    assert inference_dtype("bf16", "cpu") == torch.bfloat16
    expected = torch.bfloat16 if fast.cpu_has_native_bf16() else torch.float32
    assert inference_dtype("auto", "cpu") == expected
    with pytest.raises(LmforgeError, match="dtype"):
        inference_dtype("fp16", "cpu")

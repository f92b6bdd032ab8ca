"""Parity of `lmforge convert` with Hugging Face GPT-2, both directions, at tiny sizes."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.errors import LmforgeError
from lmforge.interop import convert
from lmforge.interop.hf_gpt2 import CONV1D_SUFFIXES
from lmforge.models import GPT
from tests.conftest import SAMPLE_TEXT, tiny_gpt

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel  # noqa: E402

ATTENTION = ("eager", "sdpa")


def hf_gpt2(vocab_size: int, tokenizer, attn: str = "eager", **overrides) -> GPT2LMHeadModel:
    config = GPT2Config(
        **{
            **dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=vocab_size),
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id,
            "attn_implementation": attn,
            **overrides,
        }
    )
    model = GPT2LMHeadModel(config).eval()
    assert model.config._attn_implementation == attn
    return model


def save_hf(model: GPT2LMHeadModel, tokenizer, path) -> None:
    model.save_pretrained(path)
    tokenizer.save(path)


def random_ids(vocab_size: int, shape=(2, 16)) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(1))


def greedy(model: GPT, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Reference greedy decoding: the full sequence through the model each step, no cache."""
    ids = prompt
    for _ in range(n):
        next_id = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- HF -> lmforge -------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("activation", ["gelu_new", "gelu_pytorch_tanh", "gelu", "relu"])
def test_hf_to_lmforge_logits_and_greedy_match(tmp_path, bpe_tokenizer, attn, activation):
    vocab = bpe_tokenizer.vocab_size
    hf = hf_gpt2(vocab, bpe_tokenizer, attn, activation_function=activation)
    save_hf(hf, bpe_tokenizer, tmp_path / "hf")

    summary = convert(tmp_path / "hf", tmp_path / "lm")
    assert "lmforge checkpoint" in summary
    ckpt = load_checkpoint(tmp_path / "lm")
    assert ckpt.meta["converted_from"]["format"] == "hf-gpt2"

    ids = random_ids(vocab)
    with torch.no_grad():
        assert max_diff(ckpt.model(ids), hf(ids).logits) <= 1e-5
        prompt = ids[:1, :5]
        ours = greedy(ckpt.model, prompt, 10)
        theirs = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=bpe_tokenizer.eos_id,
        )
    # HF stops early if it emits EOS; up to there the tokens must agree
    assert theirs.shape[1] > prompt.shape[1]
    assert torch.equal(ours[:, : theirs.shape[1]], theirs)


def test_load_checkpoint_opens_hf_folder_directly(tmp_path, bpe_tokenizer):
    hf = hf_gpt2(bpe_tokenizer.vocab_size, bpe_tokenizer)
    save_hf(hf, bpe_tokenizer, tmp_path)
    ckpt = load_checkpoint(tmp_path)
    ids = random_ids(bpe_tokenizer.vocab_size)
    with torch.no_grad():
        assert max_diff(ckpt.model(ids), hf(ids).logits) <= 1e-5
    assert ckpt.tokenizer.encode(SAMPLE_TEXT[:80]) == bpe_tokenizer.encode(SAMPLE_TEXT[:80])
    assert ckpt.model.config.tie_embeddings
    assert ckpt.model.lm_head.weight is ckpt.model.transformer.wte.weight


def test_hf_untied_and_legacy_layouts(tmp_path, bpe_tokenizer):
    """Untied lm_head; GPT2Model-style names without `transformer.` plus mask buffers; .bin weights."""
    from safetensors.torch import load_file

    vocab = bpe_tokenizer.vocab_size
    hf = hf_gpt2(vocab, bpe_tokenizer, tie_word_embeddings=False, n_inner=48)
    save_hf(hf, bpe_tokenizer, tmp_path)
    ids = random_ids(vocab)
    with torch.no_grad():
        expected = hf(ids).logits
        assert max_diff(load_checkpoint(tmp_path).model(ids), expected) <= 1e-5

    # the layout of the original 2019 checkpoints, as pickled weights
    sd = load_file(str(tmp_path / "model.safetensors"))
    legacy = {k.removeprefix("transformer."): v for k, v in sd.items()}
    legacy["h.0.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    (tmp_path / "model.safetensors").unlink()
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    with torch.no_grad():
        assert max_diff(load_checkpoint(tmp_path).model(ids), expected) <= 1e-5


# --- lmforge -> HF -------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
def test_lmforge_to_hf_loads_and_matches(tmp_path, bpe_tokenizer, attn, activation):
    vocab = bpe_tokenizer.vocab_size
    model = tiny_gpt(vocab, activation=activation)
    save_checkpoint(tmp_path / "lm", model, bpe_tokenizer)

    summary = convert(tmp_path / "lm", tmp_path / "hf")
    assert "Hugging Face gpt2 folder" in summary
    hf, info = GPT2LMHeadModel.from_pretrained(
        tmp_path / "hf", attn_implementation=attn, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, as saved
    hf.eval()
    ids = random_ids(vocab)
    with torch.no_grad():
        assert max_diff(model(ids), hf(ids).logits) <= 1e-5

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert config["eos_token_id"] == bpe_tokenizer.eos_id
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = SAMPLE_TEXT[:120]
    assert hf_tok(text)["input_ids"] == bpe_tokenizer.encode(text)
    assert hf_tok.eos_token_id == bpe_tokenizer.eos_id


def test_lmforge_untied_custom_mlp_exports(tmp_path, bpe_tokenizer):
    vocab = bpe_tokenizer.vocab_size
    model = tiny_gpt(vocab, tie_embeddings=False, mlp_hidden=48, activation="relu", norm_eps=1e-6)
    save_checkpoint(tmp_path / "lm", model, bpe_tokenizer)
    convert(tmp_path / "lm", tmp_path / "hf")
    hf, info = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    ids = random_ids(vocab)
    with torch.no_grad():
        assert max_diff(model(ids), hf.eval()(ids).logits) <= 1e-5


def test_run_folder_is_a_valid_src(tmp_path, bpe_tokenizer):
    model = tiny_gpt(bpe_tokenizer.vocab_size)
    save_checkpoint(tmp_path / "run" / "last", model, bpe_tokenizer)
    convert(tmp_path / "run", tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()


# --- round trip ----------------------------------------------------------------------------------
def test_round_trip_keeps_weights_identical(tmp_path, bpe_tokenizer):
    model = tiny_gpt(bpe_tokenizer.vocab_size, activation="gelu_tanh")
    save_checkpoint(tmp_path / "a", model, bpe_tokenizer)
    convert(tmp_path / "a", tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "b")
    back = load_checkpoint(tmp_path / "b")
    assert back.model.config == model.config
    ours, theirs = model.state_dict(), back.model.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    # the Conv1D weights really were stored transposed in between
    from safetensors.torch import load_file

    hf_sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    name = next(k for k in hf_sd if k.endswith(CONV1D_SUFFIXES[2]))  # mlp.c_fc: (in, out)
    assert hf_sd[name].shape == (32, 128)
    assert "lm_head.weight" not in hf_sd


# --- errors --------------------------------------------------------------------------------------
def test_rotary_model_export_is_refused(tmp_path, bpe_tokenizer):
    model = tiny_gpt(bpe_tokenizer.vocab_size, position="rotary", norm="rmsnorm", bias=False)
    save_checkpoint(tmp_path / "lm", model, bpe_tokenizer)
    with pytest.raises(LmforgeError, match=r"position='rotary' \(GPT-2 needs 'learned'\)") as e:
        convert(tmp_path / "lm", tmp_path / "hf")
    assert "norm='rmsnorm'" in str(e.value) and "bias=False" in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_swiglu_gqa_export_is_refused(tmp_path, bpe_tokenizer):
    model = tiny_gpt(bpe_tokenizer.vocab_size, activation="swiglu", n_kv_head=1)
    save_checkpoint(tmp_path / "lm", model, bpe_tokenizer)
    with pytest.raises(LmforgeError, match="activation='swiglu'.*|n_kv_head=1"):
        convert(tmp_path / "lm", tmp_path / "hf")


def test_unknown_hf_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(LmforgeError, match="'llama'.*model types: 'gpt2'"):
        convert(tmp_path, tmp_path / "out")
    with pytest.raises(LmforgeError, match="'llama'"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "option",
    [
        {"scale_attn_by_inverse_layer_idx": True},
        {"reorder_and_upcast_attn": True},
        {"scale_attn_weights": False},
        {"activation_function": "silu"},
    ],
)
def test_unsupported_hf_options(tmp_path, bpe_tokenizer, option):
    save_hf(
        hf_gpt2(bpe_tokenizer.vocab_size, bpe_tokenizer, **option), bpe_tokenizer, tmp_path / "hf"
    )
    key = next(iter(option))
    with pytest.raises(LmforgeError, match=key):
        convert(tmp_path / "hf", tmp_path / "lm")


def test_missing_src(tmp_path):
    with pytest.raises(LmforgeError, match="does not exist"):
        convert(tmp_path / "nope", tmp_path / "out")


def test_dst_that_is_not_a_model_is_not_overwritten(tmp_path, bpe_tokenizer):
    save_checkpoint(tmp_path / "lm", tiny_gpt(bpe_tokenizer.vocab_size), bpe_tokenizer)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    with pytest.raises(LmforgeError, match="not a model folder"):
        convert(tmp_path / "lm", tmp_path / "docs")
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"

"""Pruning: magnitude (exact sparsity, sparse storage), heads and ffn (slicing pinned by zeroing a
unit by hand first: removing it must not change a single output), recovery fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.compress.prune import (
    attentions,
    gradient_scores,
    mlps,
    prunable_weights,
    prune,
    prune_checkpoint,
    prune_ffn,
    prune_heads,
    prune_magnitude,
    sparsity_section,
    weight_scores,
)
from lmforge.data import PrepareConfig, prepare
from lmforge.errors import LmforgeError
from lmforge.generate import GenerationConfig, generate, generate_ids, generate_seq2seq_ids
from lmforge.interop import hf_gpt2
from lmforge.models import (
    ENCDEC_PRESETS,
    GPT,
    Bert,
    BertConfig,
    EncoderDecoder,
    EncoderDecoderConfig,
    GPTConfig,
)
from lmforge.nn import SelfAttention
from lmforge.train import DataConfig, TrainConfig, train
from tests.conftest import SAMPLE_TEXT

V = 35  # the char tokenizer's vocabulary (conftest), so pruned models can generate text with it
SMALL = dict(n_layer=2, n_head=4, n_embd=32, dropout=0.0)


def make(kind: str) -> torch.nn.Module:
    """Tiny models of every family, with biases and without, gated MLPs, GQA, T5's shared bias."""
    if kind == "gpt":
        return GPT(GPTConfig(vocab_size=V, block_size=16, **SMALL)).eval()
    if kind == "gpt-gqa":  # Llama-style: RMSNorm, rotary, SwiGLU, 2 key/value heads for 4 query heads
        return GPT(GPTConfig(vocab_size=V, block_size=16, n_kv_head=2, norm="rmsnorm", position="rotary",
                             activation="swiglu", bias=False, tie_embeddings=False, **SMALL)).eval()
    if kind == "bert":
        return Bert(BertConfig(vocab_size=V, max_position=16, head="mlm", **SMALL)).eval()
    preset = "t5-tiny" if kind == "t5" else "transformer-tiny"
    extra = dict(activation="geglu", activation_dropout=0.0) if kind == "t5" else {}
    return EncoderDecoder(EncoderDecoderConfig(**{
        **ENCDEC_PRESETS[preset], **SMALL, "mlp_hidden": 64, "vocab_size": V, "max_position": 16, "eos_token_id": 1,
        "relative_buckets": 8, "relative_max_distance": 12, **extra,
    })).eval()


KINDS = ("gpt", "gpt-gqa", "bert", "transformer", "t5")
IDS = torch.randint(2, V, (2, 9), generator=torch.Generator().manual_seed(0))
TARGET = torch.randint(2, V, (2, 7), generator=torch.Generator().manual_seed(1))


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, GPT):
            return model(IDS)
        if isinstance(model, Bert):
            mask = torch.ones_like(IDS)
            mask[1, -3:] = 0  # padding, so the key mask is exercised too
            return model(IDS, mask).mlm_logits
        return model(IDS, torch.ones_like(IDS), decoder_input_ids=TARGET)


@torch.no_grad()
def silence_heads(model: torch.nn.Module, pick) -> None:
    """Zero the c_proj columns of key/value group pick(i, name, module) of every attention: those
    heads then add nothing, and removing them must leave the outputs as they are."""
    for i, (name, m) in enumerate(attentions(model).items()):
        group = m.n_head // m.n_kv_head
        g = pick(i, name, m)
        m.c_proj.weight[:, g * group * m.head_dim : (g + 1) * group * m.head_dim] = 0


@torch.no_grad()
def silence_neurons(model: torch.nn.Module, n: int) -> None:
    """Zero the c_proj columns of n random hidden neurons, different in every MLP."""
    for i, m in enumerate(mlps(model).values()):
        chosen = torch.randperm(m.c_proj.in_features, generator=torch.Generator().manual_seed(i))[:n]
        m.c_proj.weight[:, chosen] = 0


# ---- config ---------------------------------------------------------------------------------------
def test_head_size_sets_the_head_width_apart_from_n_embd():
    with pytest.raises(LmforgeError, match="n_embd=30 must be divisible by n_head=4"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(LmforgeError, match="head_size must be >= 1"):
        GPTConfig(head_size=0)
    model = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=3, n_embd=32, head_size=8))
    attn = model.transformer.h[0].attn
    assert model.config.head_dim == 8 and attn.c_attn.out_features == 3 * 3 * 8 and attn.c_proj.in_features == 24
    assert model(IDS).shape == (2, 9, V)
    assert GPTConfig(n_embd=32, n_head=4).head_dim == 8  # unset: n_embd // n_head as before


# ---- magnitude ----------------------------------------------------------------------------------------
def test_magnitude_zeroes_exactly_the_smallest_weights_of_each_matrix():
    model = make("gpt")
    original = {n: w.detach().clone() for n, w in prunable_weights(model).items()}
    pruned = prune_magnitude(model, 0.3)
    weights = prunable_weights(pruned)
    assert set(weights) == set(original) and len(weights) == 2 * 4  # c_attn, c_proj, c_fc, c_proj per layer
    for name, w in weights.items():
        zero = w == 0
        assert zero.sum().item() == round(0.3 * w.numel()), name
        before = original[name].abs()
        assert before[zero].max() <= before[~zero].min()  # the largest magnitudes survive, unchanged
        assert torch.equal(w[~zero], original[name][~zero])
    # permanent: no hooks, parametrizations or masks left; the input model is untouched
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in pruned.modules())
    assert set(pruned.state_dict()) == set(model.state_dict())
    assert all(torch.equal(w, original[n]) for n, w in prunable_weights(model).items())
    # embeddings and norms are not pruned
    assert torch.equal(pruned.transformer.wte.weight, model.transformer.wte.weight)


def test_global_magnitude_uses_one_threshold_over_all_matrices():
    model = make("transformer")
    pruned = prune(model, "magnitude", 0.5, scope="global")
    before = torch.cat([w.detach().abs().flatten() for w in prunable_weights(model).values()])
    after = torch.cat([w.detach().flatten() for w in prunable_weights(pruned).values()])
    zero = after == 0
    assert zero.sum().item() == round(0.5 * after.numel())
    assert before[zero].max() <= before[~zero].min()
    per_matrix = [(w == 0).float().mean().item() for w in prunable_weights(pruned).values()]
    assert max(per_matrix) - min(per_matrix) > 0.05  # unlike scope "layer", sparsity varies by matrix


@pytest.mark.parametrize("kind", ["gpt", "bert", "t5"])
def test_magnitude_checkpoint_is_stored_sparse_and_loads_identical(tmp_path, char_tokenizer, kind):
    model = make(kind)
    pruned = prune_magnitude(model, 0.5)
    save_checkpoint(tmp_path / "dense", pruned, char_tokenizer)
    save_checkpoint(tmp_path / "sparse", pruned, char_tokenizer, extra={"sparsity": sparsity_section(pruned)})
    loaded = load_checkpoint(tmp_path / "sparse").model
    assert pruned.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(), loaded.state_dict().values()))
    assert torch.equal(outputs(loaded), outputs(pruned))

    stored = load_file(tmp_path / "sparse" / "model.safetensors")
    name = next(iter(prunable_weights(pruned)))
    assert name not in stored and stored[f"{name}.sparse_mask"].dtype == torch.uint8
    # size: every pruned fp32 weight costs 1 bit of mask + half the time 4 bytes of value
    matrices = sum(w.numel() for w in prunable_weights(pruned).values())
    dense = (tmp_path / "dense" / "model.safetensors").stat().st_size
    sparse = (tmp_path / "sparse" / "model.safetensors").stat().st_size
    expected = dense - matrices * 4 + matrices * (0.5 * 4 + 1 / 8)
    assert abs(sparse - expected) < 0.02 * dense, (sparse, expected, dense)


def test_a_damaged_sparse_checkpoint_is_named(tmp_path, char_tokenizer):
    pruned = prune_magnitude(make("gpt"), 0.5)
    section = sparsity_section(pruned)
    save_checkpoint(tmp_path / "c", pruned, char_tokenizer, extra={"sparsity": section})
    meta = json.loads((tmp_path / "c" / "config.json").read_text())
    meta["sparsity"]["tensors"]["lm_head.weight"] = [V, 32]  # listed, but stored dense
    (tmp_path / "c" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(LmforgeError, match="lm_head.weight is listed as sparse but its mask or values are missing"):
        load_checkpoint(tmp_path / "c")
    with pytest.raises(LmforgeError, match="the sparsity section does not fit the model"):  # a stale section
        save_checkpoint(tmp_path / "d", prune_ffn(pruned, 0.5), char_tokenizer, extra={"sparsity": section})


# ---- heads and ffn --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_removing_silenced_heads_leaves_every_output_equal(kind):
    model = make(kind)
    first = next(iter(attentions(model).values()))
    n_group = first.n_kv_head
    # a different group in every layer, except where T5's bias table makes a stack share one
    relative = model.config.position == "relative"
    silence_heads(model, lambda i, name, m: 1 if relative and name.endswith(".attn") else (i + 1) % n_group)
    pruned = prune_heads(model, 1 / n_group)

    c = pruned.config
    assert (c.n_head, c.n_kv_head, c.head_dim) == (4 - 4 // n_group, n_group - 1, 8)
    assert c.head_size == 8 and c.n_embd == 32 and c.mlp_hidden == model.config.mlp_hidden
    for m in attentions(pruned).values():
        assert m.c_attn.weight.shape == ((c.n_head + 2 * c.n_kv_head) * 8, 32)
        assert m.c_proj.weight.shape == (32, c.n_head * 8)
    if relative:
        assert pruned.encoder.rel_bias.table.weight.shape == (8, c.n_head)
    torch.testing.assert_close(outputs(pruned), outputs(model), rtol=0, atol=1e-5)
    assert count(pruned) < count(model)


@pytest.mark.parametrize("kind", KINDS)
def test_removing_silenced_neurons_leaves_every_output_equal(kind):
    model = make(kind)
    hidden = model.config.mlp_hidden
    silence_neurons(model, hidden // 4)
    pruned = prune_ffn(model, 0.25)
    assert pruned.config.mlp_hidden == hidden - hidden // 4
    gated = model.config.activation in ("swiglu", "geglu")
    for m in mlps(pruned).values():
        assert m.c_fc.weight.shape[0] == (2 if gated else 1) * pruned.config.mlp_hidden
        assert m.c_proj.weight.shape[1] == pruned.config.mlp_hidden
    torch.testing.assert_close(outputs(pruned), outputs(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "heads", "ffn"])
def test_amount_zero_is_the_identity(method):
    model = make("gpt-gqa")
    pruned = prune(model, method, 0.0)
    assert pruned is not model and pruned.config == model.config
    assert torch.equal(outputs(pruned), outputs(model))


def test_gradient_scores_see_silenced_units_as_worthless():
    model = make("gpt")
    silence_heads(model, lambda i, name, m: 2)
    silence_neurons(model, 8)

    def loss(m, batch):
        return torch.nn.functional.cross_entropy(m(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())

    scores = gradient_scores(model, loss, [IDS, IDS.flip(1)])
    for name in attentions(model):
        assert scores[name].shape == (4,) and scores[name][2] == 0 and (scores[name][[0, 1, 3]] > 0).all()
    for name, m in mlps(model).items():
        assert ((scores[name] == 0).sum() == 8).item() and scores[name].shape == (m.c_proj.in_features,)
    assert all(not m._forward_pre_hooks for m in model.modules())  # the gates are gone again
    # the scores choose what goes: the silenced units, so the outputs stay
    pruned = prune(prune(model, "heads", 0.25, scores=scores), "ffn", 8 / 128, scores=scores)
    torch.testing.assert_close(outputs(pruned), outputs(model), rtol=0, atol=1e-5)
    # weight-norm scores exist for every attention and MLP, per key/value group and per neuron
    assert set(weight_scores(model)) == set(scores)


@pytest.mark.parametrize("kind", ["gpt", "gpt-gqa"])
def test_a_pruned_gpt_generates_and_round_trips_through_its_checkpoint(tmp_path, char_tokenizer, kind):
    assert char_tokenizer.vocab_size == V
    model = make(kind)
    silence_heads(model, lambda i, name, m: 0)
    pruned = prune(prune_heads(model, 1 / model.config.n_kv_head), "ffn", 0.25)
    greedy = GenerationConfig(max_new_tokens=8, do_sample=False)
    prompts = [[3, 4, 5], [6, 7]]
    # the KV cache takes the pruned n_kv_head and head size from the config
    assert generate_ids(pruned, prompts, greedy) == generate_ids(prune_ffn(model, 0.25), prompts, greedy)

    save_checkpoint(tmp_path / "c", pruned, char_tokenizer)
    ckpt = load_checkpoint(tmp_path / "c")
    assert ckpt.model.config == pruned.config
    assert torch.equal(outputs(ckpt.model), outputs(pruned))
    text = generate(ckpt.model, ckpt.tokenizer, "The quick", GenerationConfig(max_new_tokens=5, do_sample=False))
    assert len(text[0].token_ids) == 5


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_pruned_encoders_and_encoder_decoders_round_trip(tmp_path, char_tokenizer, kind):
    model = make(kind)
    pruned = prune(prune(model, "heads", 0.5), "ffn", 0.5)
    save_checkpoint(tmp_path / "c", pruned, char_tokenizer)
    loaded = load_checkpoint(tmp_path / "c").model
    assert loaded.config == pruned.config and loaded.config.n_head == 2 and loaded.config.head_dim == 8
    assert torch.equal(outputs(loaded), outputs(pruned))
    if kind == "t5":
        greedy = GenerationConfig(max_new_tokens=6, do_sample=False)
        out = generate_seq2seq_ids(loaded, IDS.tolist(), greedy)
        assert out == generate_seq2seq_ids(pruned, IDS.tolist(), greedy) and len(out) == 2


def test_hf_export_refuses_pruned_heads_and_takes_pruned_neurons():
    model = make("gpt")
    with pytest.raises(LmforgeError, match="head_size=8 with n_head=3 .GPT-2 needs heads that split n_embd=32"):
        hf_gpt2.check_exportable(prune_heads(model, 0.25).config)
    hf_gpt2.check_exportable(prune_ffn(model, 0.25).config)  # n_inner carries mlp_hidden


def test_pruned_t5_exports_to_hugging_face_and_matches(tmp_path, bpe_tokenizer):
    pytest.importorskip("transformers")
    from transformers import T5ForConditionalGeneration

    from lmforge.interop import convert

    config = EncoderDecoderConfig(**{
        **ENCDEC_PRESETS["t5-tiny"], **SMALL, "mlp_hidden": 64, "vocab_size": bpe_tokenizer.vocab_size,
        "relative_buckets": 8, "relative_max_distance": 12, "eos_token_id": 1,
    })
    pruned = prune(EncoderDecoder(config).eval(), "heads", 0.25)  # d_kv stays 8 with 3 heads in d_model 32
    save_checkpoint(tmp_path / "lm", pruned, bpe_tokenizer)
    convert(tmp_path / "lm", tmp_path / "hf")
    hf = T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert (hf.config.num_heads, hf.config.d_kv) == (3, 8)
    with torch.no_grad():
        ours = pruned(IDS, decoder_input_ids=TARGET)
        theirs = hf(input_ids=IDS, decoder_input_ids=TARGET).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


# ---- user errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("amount", [-0.1, 1.0, 1.5])
def test_amount_outside_zero_one_is_refused(amount):
    with pytest.raises(LmforgeError, match=r"amount must be in \[0, 1\)"):
        prune(make("gpt"), "heads", amount)


def test_bad_method_and_unprunable_cases_are_refused():
    with pytest.raises(LmforgeError, match="unknown pruning method 'neurons'; choose one of 'magnitude', 'heads', 'ffn'"):
        prune(make("gpt"), "neurons", 0.3)
    with pytest.raises(LmforgeError, match="scope"):
        prune(make("gpt"), "magnitude", 0.3, scope="row")
    # multi-query attention: all query heads share one key/value head, a group that must stay
    mqa = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=4, n_kv_head=1, n_embd=32))
    with pytest.raises(LmforgeError, match="n_kv_head=1, each shared by 4 query heads.*only one per layer"):
        prune_heads(mqa, 0.5)
    with pytest.raises(LmforgeError, match=r"amount=0.1 removes none of the 4 attention heads .*amount >= 0.125"):
        prune_heads(make("gpt"), 0.1)


# ---- prune_checkpoint and recovery ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained GPT on character data, and the data folder."""
    root = tmp_path_factory.mktemp("prune")
    (root / "corpus.txt").write_text(SAMPLE_TEXT * 3)
    prepare(PrepareConfig(source=str(root / "corpus.txt"), tokenizer="char"), root / "data", progress=False)
    vocab = json.loads((root / "data" / "manifest.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    train(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=vocab), fast(max_iters=60),
          DataConfig(str(root / "data")), root / "run", progress=False)
    return root / "run", DataConfig(str(root / "data"))


def fast(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(batch_size=8, max_iters=20, eval_interval=20, eval_iters=2, log_interval=5,
                                 warmup_iters=2, precision="fp32", lr=3e-3, device="cpu"), **kw})


def test_heads_recovery_lowers_the_pruned_loss_and_writes_a_run(tmp_path, trained):
    run, data = trained
    report = prune_checkpoint(run, tmp_path / "out", "heads", 0.5, data=data, train_config=fast(),
                              recover=True, progress=False)
    assert report.score == "gradient" and report.recovery_iters == 20
    assert report.val_loss_pruned > report.val_loss_before  # half the heads cost something
    evals = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in evals if r["kind"] == "eval"]
    assert val[0] == pytest.approx(report.val_loss_pruned, abs=1e-4)  # step 0 is the pruned model
    assert val[-1] < val[0]  # and fine-tuning recovers
    assert report.val_loss_recovered <= report.val_loss_pruned
    assert report.out == tmp_path / "out" / "best" and (tmp_path / "out" / "last" / "state.pt").is_file()
    ckpt = load_checkpoint(tmp_path / "out")
    assert ckpt.model.config.n_head == 2 and ckpt.meta["prune"]["method"] == "heads"
    assert report.params_after == sum(p.numel() for p in ckpt.model.parameters()) < report.params_before
    assert len(ckpt.generate("The", max_new_tokens=4, do_sample=False)[0].token_ids) == 4


def test_magnitude_recovery_keeps_the_zeros(tmp_path, trained):
    run, data = trained
    report = prune_checkpoint(run, tmp_path / "out", "magnitude", 0.5, data=data, train_config=fast(max_iters=6),
                              recover=True, progress=False)
    expected = prune_magnitude(load_checkpoint(run).model, 0.5)
    for folder in ("best", "last"):
        ckpt = load_checkpoint(tmp_path / "out" / folder)
        assert "sparsity" in ckpt.meta and ckpt.meta["train"]["max_iters"] == 6
        for name, w in prunable_weights(ckpt.model).items():
            assert torch.equal(w == 0, prunable_weights(expected)[name] == 0), (folder, name)
    last = load_checkpoint(tmp_path / "out" / "last").model  # trained 6 steps: moved, yet as sparse
    assert not torch.equal(last.transformer.h[0].attn.c_attn.weight, expected.transformer.h[0].attn.c_attn.weight)
    assert report.bytes_after < 0.75 * report.bytes_before


def test_prune_checkpoint_without_data_writes_a_checkpoint(tmp_path, trained):
    run, _ = trained
    report = prune_checkpoint(run, tmp_path / "out", "ffn", 0.5, progress=False)
    assert report.out == tmp_path / "out" and report.val_loss_before is None and report.score == "weight-norm"
    assert report.bytes_after < report.bytes_before and report.params_after < report.params_before
    assert load_checkpoint(tmp_path / "out").model.config.mlp_hidden == 64
    with pytest.raises(LmforgeError, match="exists and is not empty"):
        prune_checkpoint(run, tmp_path / "out", "ffn", 0.5, progress=False)
    with pytest.raises(LmforgeError, match="recovery fine-tuning needs data"):
        prune_checkpoint(run, tmp_path / "other", "ffn", 0.5, recover=True, progress=False)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_attention_is_found():
    # cross-attention is a SelfAttention subclass: the decoder's layers each hold two
    model = make("t5")
    assert len(attentions(model)) == 2 + 2 * 2
    assert all(isinstance(m, SelfAttention) for m in attentions(model).values())

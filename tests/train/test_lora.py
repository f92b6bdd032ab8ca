"""LoRA: the adapted layer's math, what is trainable, merging, adapter files, and a LoRA fine-tuning run."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lmforge.checkpoint import load_checkpoint
from lmforge.compress.quantize import QuantizedLinear, quantize
from lmforge.errors import LmforgeError
from lmforge.models.bert import Bert
from lmforge.train.finetune import finetune, model_for_task
from lmforge.train.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraConfig,
    LoraLinear,
    apply_lora,
    count_parameters,
    load_adapted_checkpoint,
    load_adapter,
    lora_state_dict,
    merge_lora,
    merged_copy,
    save_adapter,
)
from lmforge.train.optim import make_optimizer
from tests.conftest import tiny_gpt
from tests.models.test_bert import padded_batch, tiny_bert
from tests.models.test_encoder_decoder import batch as encdec_batch
from tests.models.test_encoder_decoder import tiny_encdec
from tests.train.test_finetune import _StopAfter, fast, files  # noqa: F401  (the module-scoped data fixture)


def _randomize_adapters(model: nn.Module) -> None:
    """B starts at zero (the adapted model is the base); give it values so the update shows."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


# ---- the layer --------------------------------------------------------------------------------
def test_lora_linear_math_and_merge():
    torch.manual_seed(0)
    base = nn.Linear(12, 20)
    layer = LoraLinear(base, rank=4, alpha=8)
    x = torch.randn(3, 5, 12)
    assert torch.equal(layer(x), base(x))  # B = 0: exactly the base
    assert layer.lora_A.shape == (4, 12) and layer.lora_B.shape == (20, 4) and layer.scale == 2.0
    assert layer.lora_A.abs().sum() > 0  # A is initialised (Kaiming-uniform), not zero
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = base(x) + x @ layer.lora_A.T @ layer.lora_B.T * 2.0
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    # the effective weight (what cross-attention reads) agrees with the call
    torch.testing.assert_close(nn.functional.linear(x, layer.weight, layer.bias), expected, atol=1e-5, rtol=0)
    merged = layer.merged()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=0)


def test_dropout_only_on_the_adapter_path():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 8), rank=2, alpha=2, dropout=0.5).train()
    x = torch.randn(4, 8)
    assert torch.equal(layer(x), layer.base(x))  # B = 0, so dropout changes nothing yet
    with torch.no_grad():
        layer.lora_B.fill_(1.0)
    assert not torch.equal(layer(x), layer(x))  # two dropout masks
    layer.eval()
    assert torch.equal(layer(x), layer(x))


# ---- apply, train, merge: every family --------------------------------------------------------
def _steps(model: nn.Module, loss_fn, n: int = 3) -> None:
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(n):
        loss_fn(model).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def _check_train_and_merge(model: nn.Module, config: LoraConfig, loss_fn, forward, n_adapted: int):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, config)
    adapted = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(adapted) == n_adapted
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    assert all(n.endswith((".lora_A", ".lora_B")) or any(n.startswith(s + ".") for s in config.modules_to_save)
               for n in trainable)
    expected = sum(config.rank * (m.in_features + m.out_features) for m in adapted)
    expected += sum(p.numel() for n, p in model.named_parameters()
                    if any(n.startswith(s + ".") for s in config.modules_to_save))
    assert count_parameters(model)[0] == expected
    _steps(model, loss_fn)
    # the frozen base is bit-identical; every adapter moved
    after = model.state_dict()
    for name, tensor in before.items():
        key = name if name in after else name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        if not any(name.startswith(s + ".") for s in config.modules_to_save):
            assert torch.equal(after[key], tensor), name
    assert all(m.lora_B.abs().sum() > 0 for m in adapted)
    adapted_out = forward(model)
    merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert set(model.state_dict()) == set(before)
    torch.testing.assert_close(forward(model), adapted_out, atol=1e-5, rtol=0)


def test_gpt_lora_train_and_merge():
    torch.manual_seed(0)
    model = tiny_gpt()
    idx = torch.randint(0, 64, (2, 16))

    def loss_fn(m):
        logits = m(idx[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())

    config = LoraConfig(rank=4, alpha=8, target_modules=("c_attn", "mlp.c_proj"))
    _check_train_and_merge(model, config, loss_fn, lambda m: m(idx), n_adapted=4)


def test_encoder_decoder_lora_train_and_merge():
    torch.manual_seed(0)
    model = tiny_encdec()
    src, src_mask, tgt = encdec_batch()

    def forward(m):
        return m(src, src_mask, decoder_input_ids=tgt[:, :-1])

    def loss_fn(m):
        return nn.functional.cross_entropy(forward(m).flatten(0, 1), tgt[:, 1:].flatten())

    # c_attn: encoder and decoder self-attention and the decoder's cross-attention, which
    # applies slices of the weight itself; attn.c_proj: self-attention outputs only
    config = LoraConfig(rank=2, alpha=4, target_modules=("c_attn", "attn.c_proj"))
    _check_train_and_merge(model, config, loss_fn, forward, n_adapted=2 + 2 * 2 + 2 + 2)
    assert "cross_attn" in str([n for n, _ in tiny_encdec().named_modules()])


def test_bert_lora_with_a_fresh_head_trains_the_head():
    torch.manual_seed(0)
    model = tiny_bert(head="classification")
    inputs = padded_batch()
    labels = torch.tensor([0, 2])

    def loss_fn(m):
        return nn.functional.cross_entropy(m(**inputs).logits, labels)

    config = LoraConfig(rank=4, target_modules=("c_attn", "c_proj", "c_fc"), modules_to_save=("classifier",))
    head = model.classifier.weight.clone()
    _check_train_and_merge(model, config, loss_fn, lambda m: m(**inputs).logits, n_adapted=2 * 4)
    assert not torch.equal(model.classifier.weight, head)


def test_train_bias_options():
    model = apply_lora(tiny_bert(), LoraConfig(target_modules=("c_attn",), train_bias="lora_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"h.0.attn.c_attn.base.bias", "h.1.attn.c_attn.base.bias"} <= trainable
    assert "h.0.attn.c_proj.bias" not in trainable
    model = apply_lora(tiny_bert(), LoraConfig(train_bias="all"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "h.0.attn.c_proj.bias" in trainable and "h.0.ln_1.bias" in trainable
    assert "h.0.attn.c_proj.weight" not in trainable


# ---- bad configs -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, fragment", [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(alpha=0), "alpha must be > 0"),
    (dict(dropout=1.0), "dropout must be in [0, 1)"),
    (dict(train_bias="some"), "train_bias"),
    (dict(target_modules=()), "at least one"),
])
def test_bad_config(kwargs, fragment):
    with pytest.raises(LmforgeError, match=fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        LoraConfig(**kwargs)


def test_unknown_target_lists_the_linear_layers():
    with pytest.raises(LmforgeError) as e:
        apply_lora(tiny_gpt(), LoraConfig(target_modules=("q_proj", "c_attn")))
    message = str(e.value)
    assert "'q_proj'" in message and "'c_attn'" not in message.split("Linear layers are")[0]
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        assert name in message
    model = tiny_gpt()
    with pytest.raises(LmforgeError, match="tied to the embedding"):
        apply_lora(model, LoraConfig(target_modules=("c_attn", "lm_head")))
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # a refused config changes nothing
    with pytest.raises(LmforgeError, match="modules_to_save 'classifier'"):
        apply_lora(tiny_gpt(), LoraConfig(modules_to_save=("classifier",)))
    model = apply_lora(tiny_gpt(), LoraConfig())
    with pytest.raises(LmforgeError, match="already has LoRA adapters"):
        apply_lora(model, LoraConfig())


# ---- adapter folders ---------------------------------------------------------------------------
def test_adapter_round_trip_and_strict_loading(tmp_path):
    torch.manual_seed(0)
    model = apply_lora(tiny_gpt(), LoraConfig(rank=4, target_modules=("c_attn", "c_fc")))
    _randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", base="some/base")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {ADAPTER_WEIGHTS, ADAPTER_CONFIG}
    idx = torch.randint(0, 64, (2, 10))
    fresh = tiny_gpt()
    fresh.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items()
                           if "lora_" not in k})
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(idx), model(idx))
    # a base of another width: the error says so, with the hashes
    with pytest.raises(LmforgeError, match="does not fit this model.*shape"):
        load_adapter(tiny_gpt(n_embd=48), tmp_path / "adapter")
    with pytest.raises(LmforgeError, match="not a LoRA adapter folder"):
        load_adapter(tiny_gpt(), tmp_path)


def test_qlora_over_an_int8_base():
    """An adapter over a quantized layer: the integers stay frozen, the adapter trains in float."""
    torch.manual_seed(0)
    model = tiny_gpt()
    quantize(model, "int8-weight")
    qweights = {n: t.clone() for n, t in model.state_dict().items() if n.endswith("qweight")}
    with pytest.raises(LmforgeError, match="every quantized layer.*attn.c_proj, mlp.c_fc, mlp.c_proj"):
        apply_lora(model, LoraConfig(target_modules=("c_attn",)))
    apply_lora(model, LoraConfig(rank=4, target_modules=("c_attn", "c_proj", "c_fc")))
    assert all(isinstance(m.base, QuantizedLinear) for m in model.modules() if isinstance(m, LoraLinear))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    idx = torch.randint(0, 64, (2, 16))

    def loss_fn(m):
        return nn.functional.cross_entropy(m(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())

    first = loss_fn(model).item()
    _steps(model, loss_fn, n=5)
    assert loss_fn(model).item() < first
    after = model.state_dict()
    assert all(torch.equal(after[n.replace(".qweight", ".base.qweight")], t) for n, t in qweights.items())
    out = model(idx)
    # the first layer's adapters learned: the gradient went back through the quantized layers above
    assert model.transformer.h[0].attn.c_attn.lora_B.abs().sum() > 0
    merge_lora(model)  # the adapted layers become float Linear layers
    assert type(model.transformer.h[0].attn.c_attn) is nn.Linear
    # the int8 kernel rounds activations to bf16, the merged float layer does not
    torch.testing.assert_close(model(idx), out, atol=5e-3, rtol=0)


# ---- LoRA fine-tuning --------------------------------------------------------------------------
LORA = LoraConfig(rank=4, alpha=8, target_modules=("c_attn", "c_proj"))


@pytest.fixture(scope="module")
def lora_run(files):  # noqa: F811
    out = files["root"] / "lora"
    result = finetune(files["base"], files["train_tsv"], files["dev_tsv"], out,
                      fast(epochs=4, lr=2e-2), progress=False, lora=LORA)
    return out, result


def test_lora_finetune_changes_only_adapters_and_head(lora_run, files):  # noqa: F811
    out, result = lora_run
    assert result.best_score == 1.0  # as full fine-tuning (tests/train/test_finetune.py)
    base = load_checkpoint(files["base"]).model
    best = load_checkpoint(out / "best")  # an ordinary, merged checkpoint
    assert isinstance(best.model, Bert) and best.model.config.head == "classification"
    assert not any(isinstance(m, LoraLinear) for m in best.model.modules())
    base_tensors, merged = base.state_dict(), best.model.state_dict()
    changed = sorted(n for n, t in merged.items() if n in base_tensors and not torch.equal(t, base_tensors[n]))
    # only the adapted matrices changed (biases stay frozen with train_bias="none")
    assert changed and all(n.endswith(("attn.c_attn.weight", "c_proj.weight")) for n in changed), changed
    # the merged weight is the base plus B @ A * scale from the adapter file
    adapter = load_file(str(out / "adapter" / ADAPTER_WEIGHTS))
    assert set(adapter) >= {"classifier.weight", "pooler.weight"}  # the fresh head and pooler, in full
    a, b = adapter["h.0.attn.c_attn.lora_A"], adapter["h.0.attn.c_attn.lora_B"]
    torch.testing.assert_close(merged["h.0.attn.c_attn.weight"],
                               base_tensors["h.0.attn.c_attn.weight"] + b @ a * 2.0, atol=1e-6, rtol=0)
    size = (out / "adapter" / ADAPTER_WEIGHTS).stat().st_size
    assert size < 0.5 * (out / "best" / "model.safetensors").stat().st_size


def test_lora_adapter_on_the_base_reproduces_the_merged_best(lora_run, files):  # noqa: F811
    out, result = lora_run
    inputs = padded_batch(vocab_size=files["tokenizer"].vocab_size)
    best = load_checkpoint(out / "best").model
    base = load_checkpoint(files["base"]).model
    model, _ = model_for_task(base, "classification", result.labels)
    load_adapter(model.eval(), out / "adapter")
    torch.testing.assert_close(model(**inputs).logits, best(**inputs).logits, atol=1e-5, rtol=0)
    # the same from the folders alone, the base's path taken from the adapter's config
    ckpt = load_adapted_checkpoint(None, out / "adapter")
    torch.testing.assert_close(merged_copy(ckpt.model)(**inputs).logits, best(**inputs).logits, atol=1e-5, rtol=0)
    # a base that does not fit the adapter
    with pytest.raises(LmforgeError, match="does not fit this model"):
        load_adapter(tiny_bert(vocab_size=files["tokenizer"].vocab_size, n_embd=48, head="classification",
                               num_labels=2), out / "adapter")


def test_lora_finetune_resume_matches_an_uninterrupted_run(lora_run, files, monkeypatch):  # noqa: F811
    """Stopped mid-epoch and resumed: the adapters come back from state.pt, the frozen base from
    `base`, and the run ends where the uninterrupted one did."""
    import lmforge.train.finetune as finetune_module

    out, full = lora_run
    stopped = files["root"] / "lora_stopped"
    with monkeypatch.context() as m:
        m.setattr(finetune_module, "_GracefulStop", lambda: _StopAfter(5))
        first = finetune(files["base"], files["train_tsv"], files["dev_tsv"], stopped, fast(epochs=4, lr=2e-2),
                         progress=False, lora=LORA)
    assert first.stop_reason == "interrupted"
    resumed = finetune(None, None, None, stopped, progress=False, resume=True)
    assert resumed.steps == full.steps and resumed.best_score == full.best_score
    a = load_checkpoint(out / "last").model.state_dict()
    b = load_checkpoint(stopped / "last").model.state_dict()
    assert (stopped / "adapter" / ADAPTER_CONFIG).is_file()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_lora_token_classification(files):  # noqa: F811
    out = files["root"] / "lora_ner"
    config = fast(task="token-classification", epochs=2, lr=2e-2)
    result = finetune(files["base"], files["train_conll"], files["dev_conll"], out, config, progress=False, lora=LORA)
    assert result.metric == "f1" and result.steps == 16
    adapter = load_file(str(out / "adapter" / ADAPTER_WEIGHTS))
    # the token classifier reads every token, with no pooler: only the classifier is saved whole
    assert {n for n in adapter if "lora_" not in n} == {"classifier.weight", "classifier.bias"}
    best = load_checkpoint(out / "best").model
    assert best.config.head == "token-classification" and best.config.labels == result.labels


def test_frozen_matmul_weights_counts_what_gets_no_weight_gradient():
    """The MFU of a LoRA run counts 4 FLOPs (not 6) for these: every frozen Linear weight, the
    tied lm_head once, and nothing that trains."""
    from lmforge.train.lora import frozen_matmul_weights

    model = tiny_gpt(64)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert frozen_matmul_weights(model) == 0  # nothing frozen before LoRA
    apply_lora(model, LoraConfig(rank=2, target_modules=("c_attn",)))
    assert frozen_matmul_weights(model) == sum(m.weight.numel() for m in linears)
    model.lm_head.weight.requires_grad_(True)  # e.g. a head trained in full
    assert frozen_matmul_weights(model) == sum(m.weight.numel() for m in linears) - model.lm_head.weight.numel()

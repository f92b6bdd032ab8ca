"""LoRA for the generative families: GPT chat SFT (and QLoRA over an int8 base), encoder-decoder
seq2seq fine-tuning and `train` from an initial checkpoint, with exact resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge.checkpoint import load_checkpoint, save_checkpoint, weights_state_dict
from lmforge.compress.quantize import QuantizedLinear, quantize
from lmforge.data import open_data
from lmforge.errors import LmforgeError
from lmforge.models import GPT, EncoderDecoder
from lmforge.tokenizer import train_tokenizer
from lmforge.train import DataConfig, train
from lmforge.train.chat import ChatConfig, finetune_chat
from lmforge.train.lora import (
    ADAPTER_WEIGHTS,
    BLOCK_LINEARS,
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_adapted_checkpoint,
    merge_lora,
    merged_state_dict,
    read_adapter_config,
)
from lmforge.train.seq2seq import finetune_seq2seq
from tests.conftest import SAMPLE_TEXT, tiny_gpt
from tests.data.test_parallel import prepare_toy, toy_pairs, write_aligned
from tests.train.test_chat_sft import CHATS, write_chats
from tests.train.test_seq2seq import tiny
from tests.train.test_trainer import fast_train_config, small_data, tiny_config, train_losses  # noqa: F401

LORA = LoraConfig(rank=4, alpha=8, dropout=0.1, target_modules=BLOCK_LINEARS)


def check_lora_run(base_path, run_dir, inputs, forward, n_layers: int, best: str = "best"):
    """What every LoRA run must leave: `best` an ordinary checkpoint whose adapted matrices are the
    base's plus B @ A * scale from RUN_DIR/adapter and whose every other tensor is the base's, bit
    for bit; the adapter over the base computing what `best` computes; merging it giving `best`
    exactly (`lmforge lora merge`); the adapter file a fraction of the checkpoint."""
    adapter = load_file(str(run_dir / "adapter" / ADAPTER_WEIGHTS))
    meta = read_adapter_config(run_dir / "adapter")
    assert meta["base"] == str(base_path)
    layers = {name.rpartition(".")[0] for name in adapter if name.endswith(".lora_A")}
    assert len(layers) == n_layers
    assert set(adapter) == {
        f"{layer}.lora_{ab}" for layer in layers for ab in "AB"
    }  # nothing else trained
    base = load_checkpoint(base_path).model
    merged = load_checkpoint(run_dir / best).model
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    base_tensors, merged_tensors = weights_state_dict(base), merged.state_dict()
    scale = meta["lora"]["alpha"] / meta["lora"]["rank"]
    for name, tensor in base_tensors.items():
        layer = name.rpartition(".")[0]
        if layer in layers and name.endswith(".weight"):
            expected = tensor + adapter[f"{layer}.lora_B"] @ adapter[f"{layer}.lora_A"] * scale
            torch.testing.assert_close(merged_tensors[name], expected, atol=1e-6, rtol=0)
            assert not torch.equal(merged_tensors[name], tensor), name  # the adapter learned
        else:  # embeddings, norms, biases, the tied head: frozen
            assert torch.equal(merged_tensors[name], tensor), name
    # the adapter over the base, unmerged, computes what the merged checkpoint computes
    adapted = load_adapted_checkpoint(base_path, run_dir / "adapter").model.eval()
    torch.testing.assert_close(
        forward(adapted, inputs), forward(merged.eval(), inputs), atol=1e-5, rtol=0
    )
    # `lmforge lora merge` does this: bit for bit the saved checkpoint
    merge_lora(adapted)
    assert set(adapted.state_dict()) == set(merged_tensors)
    assert all(torch.equal(t, merged_tensors[n]) for n, t in adapted.state_dict().items())
    size = (run_dir / "adapter" / ADAPTER_WEIGHTS).stat().st_size
    assert size < 0.4 * (run_dir / best / "model.safetensors").stat().st_size


def gpt_logits(model, idx):
    return model(idx)


def test_merged_state_dict_is_what_merging_leaves():
    torch.manual_seed(0)
    model = apply_lora(tiny_gpt(), LORA)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.normal_()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    tensors = merged_state_dict(model)
    assert all(
        torch.equal(t, before[n]) for n, t in model.state_dict().items()
    )  # the model is as it was
    merged = weights_state_dict(merge_lora(model))
    assert list(tensors) != [] and set(tensors) == set(merged)
    assert all(torch.equal(tensors[n], merged[n]) for n in merged)
    assert "lm_head.weight" not in tensors  # tied: stored once, as the embedding


# ---- GPT: chat SFT ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_lora")
    tok = train_tokenizer("bpe", [SAMPLE_TEXT], vocab_size=300)
    torch.manual_seed(0)
    save_checkpoint(root / "base", tiny_gpt(tok.vocab_size, block_size=96), tok)
    return root, write_chats(root / "train.jsonl", CHATS * 2), tok


CHAT_CONFIG = ChatConfig(
    epochs=3, batch_size=2, lr=1e-2, precision="fp32", device="cpu", warmup_ratio=0.0
)


def test_chat_lora_trains_only_adapters_and_writes_merged_checkpoints(chat_setup):
    root, train_file, tok = chat_setup
    result = finetune_chat(
        root / "base",
        train_file,
        root / "run",
        dev_file=train_file,
        config=CHAT_CONFIG,
        progress=False,
        lora=LORA,
    )
    losses = [r["dev_loss"] for r in result.history]
    assert result.steps == 12 and losses[-1] < losses[0]
    idx = torch.randint(0, tok.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj); never the lm_head tied to the embedding
    check_lora_run(root / "base", root / "run", idx, gpt_logits, n_layers=8)
    best = load_checkpoint(root / "run")  # what `lmforge chat`/`generate`/`serve` load
    assert (
        best.meta["lora"]["target_modules"] == list(BLOCK_LINEARS) and best.tokenizer.chat_template
    )


def test_chat_lora_without_dev_keeps_last_adapter(chat_setup):
    root, train_file, tok = chat_setup
    finetune_chat(
        root / "base",
        train_file,
        root / "nodev",
        config=CHAT_CONFIG,
        progress=False,
        lora=LoraConfig(rank=2, target_modules=("c_attn",)),
    )
    assert not (root / "nodev" / "best").exists()
    idx = torch.randint(0, tok.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    check_lora_run(root / "base", root / "nodev", idx, gpt_logits, n_layers=2, best="last")


def test_qlora_chat_over_an_int8_base(chat_setup):
    """The base from `lmforge quantize`: integers frozen, adapters on every quantized layer,
    merged checkpoints float."""
    root, train_file, tok = chat_setup
    model = load_checkpoint(root / "base").model
    quantize(model, "int8-weight")
    save_checkpoint(root / "qbase", model, tok)
    with pytest.raises(LmforgeError, match="cannot fine-tune a quantized model"):
        finetune_chat(root / "qbase", train_file, root / "q0", config=CHAT_CONFIG, progress=False)
    with pytest.raises(LmforgeError, match="every quantized layer"):
        finetune_chat(
            root / "qbase",
            train_file,
            root / "q1",
            config=CHAT_CONFIG,
            progress=False,
            lora=LoraConfig(target_modules=("c_attn",)),
        )
    result = finetune_chat(
        root / "qbase",
        train_file,
        root / "q",
        dev_file=train_file,
        config=CHAT_CONFIG,
        progress=False,
        lora=LORA,
    )
    assert result.history[-1]["dev_loss"] < result.history[0]["dev_loss"]
    best = load_checkpoint(root / "q")
    assert "quantization" not in best.meta
    assert not any(isinstance(m, QuantizedLinear) for m in best.model.modules())
    adapted = load_adapted_checkpoint(root / "qbase", root / "q" / "adapter").model.eval()
    assert all(
        isinstance(m.base, QuantizedLinear) for m in adapted.modules() if isinstance(m, LoraLinear)
    )
    c_attn = adapted.transformer.h[0].attn.c_attn
    torch.testing.assert_close(
        best.model.transformer.h[0].attn.c_attn.weight,
        c_attn.base.weight + c_attn.delta(),
        atol=1e-6,
        rtol=0,
    )  # dequantized base + B @ A * scale
    idx = torch.randint(0, tok.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    # the int8 kernel rounds activations to bf16, the merged float layers do not
    torch.testing.assert_close(adapted(idx), best.model(idx), atol=2e-2, rtol=0)
    merged = merge_lora(adapted).state_dict()
    assert all(torch.equal(t, merged[n]) for n, t in best.model.state_dict().items())


# ---- encoder-decoder: seq2seq fine-tuning -------------------------------------------------------
def test_seq2seq_lora(tmp_path):
    data = prepare_toy(tmp_path, n=200)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "base", EncoderDecoder(tiny(data)), data.tokenizer)
    src, tgt = write_aligned(tmp_path, toy_pairs(64, seed=5))
    dsrc, dtgt = write_aligned(tmp_path, toy_pairs(16, seed=6), name="dev")
    result = finetune_seq2seq(
        tmp_path / "base",
        str(src),
        str(dsrc),
        tmp_path / "ft",
        train_target=str(tgt),
        dev_target=str(dtgt),
        epochs=2,
        batch_size=16,
        lr=1e-2,
        precision="fp32",
        progress=False,
        lora=LORA,
    )
    assert result.iters == 8
    records = [
        json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [r["val_loss"] for r in records if r["kind"] == "eval"]
    assert len(evals) == 3 and evals[-1] < evals[0]
    g = torch.Generator().manual_seed(1)
    inputs = (
        torch.randint(3, data.vocab_size, (2, 9), generator=g),
        torch.randint(3, data.vocab_size, (2, 7), generator=g),
    )

    def forward(model, inputs):
        return model(inputs[0], decoder_input_ids=inputs[1])

    # 2 encoder blocks x 4 + 2 decoder blocks x 6 (self-attention, cross-attention, MLP)
    check_lora_run(tmp_path / "base", tmp_path / "ft", inputs, forward, n_layers=20)
    again = finetune_seq2seq(None, None, None, tmp_path / "ft", resume=True, progress=False)
    assert (
        again.iters == 8 and again.stop_reason == "max_iters"
    )  # resumed with its adapters, nothing to do


# ---- train from a checkpoint: continued pretraining with LoRA, exact resume -----------------------
@pytest.fixture(scope="module")
def gpt_base(tmp_path_factory, small_data):  # noqa: F811
    path = tmp_path_factory.mktemp("train_lora") / "base"
    torch.manual_seed(0)
    config = tiny_config(
        open_data(small_data).vocab_size, dropout=0.1
    )  # dropout: the saved RNG matters
    save_checkpoint(path, GPT(config), open_data(small_data).tokenizer)
    return path


def run_train(base, small_data, out, **kw):  # noqa: F811
    tc = fast_train_config(
        **{**dict(max_iters=12, lr_decay_iters=12, eval_interval=4, lr=1e-2), **kw}
    )
    model = load_checkpoint(base).model
    return train(
        model.config,
        tc,
        DataConfig(str(small_data)),
        out,
        progress=False,
        init_model=model,
        lora=LORA,
        base=base,
    )


def test_train_lora_resumes_exactly(tmp_path, gpt_base, small_data):  # noqa: F811
    full = run_train(gpt_base, small_data, tmp_path / "full")
    assert full.iters == 12
    idx = torch.randint(
        0, open_data(small_data).vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    check_lora_run(gpt_base, tmp_path / "full", idx, gpt_logits, n_layers=8)
    state = torch.load(tmp_path / "full" / "last" / "state.pt", weights_only=False)
    assert set(state["lora"]) == set(
        load_file(str(tmp_path / "full" / "adapter" / ADAPTER_WEIGHTS))
    )

    run_train(gpt_base, small_data, tmp_path / "part", max_time=1e-9)  # stops after its first step
    # the base comes back from the path the run recorded
    resumed = train(
        None,
        fast_train_config(max_iters=12, lr_decay_iters=12, eval_interval=4, lr=1e-2),
        DataConfig(str(small_data)),
        tmp_path / "part",
        resume=True,
        progress=False,
    )
    assert resumed.iters == 12
    assert train_losses(tmp_path / "full") == train_losses(tmp_path / "part")  # every step, exactly
    for name in ("last", "best"):
        a = load_checkpoint(tmp_path / "full" / name).model.state_dict()
        b = load_checkpoint(tmp_path / "part" / name).model.state_dict()
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], name
    a, b = (
        load_file(str(tmp_path / run / "adapter" / ADAPTER_WEIGHTS)) for run in ("full", "part")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_lora_errors(tmp_path, gpt_base, small_data):  # noqa: F811
    model = load_checkpoint(gpt_base).model
    tc, data = fast_train_config(max_iters=2, eval_interval=2), DataConfig(str(small_data))

    def resume(run, **kw):
        return train(None, tc, data, tmp_path / run, resume=True, progress=False, **kw)

    with pytest.raises(LmforgeError, match="not random weights.*--init-from"):
        train(model.config, tc, data, tmp_path / "a", progress=False, lora=LORA)
    run_train(gpt_base, small_data, tmp_path / "r", max_iters=2)
    # resuming over another base: merging would not give the saved weights
    torch.manual_seed(1)
    with pytest.raises(LmforgeError, match="is it the base this run started from"):
        resume("r", init_model=GPT(model.config))
    with pytest.raises(LmforgeError, match="a resumed run keeps it"):
        resume("r", lora=LoraConfig(rank=2))
    train(model.config, tc, data, tmp_path / "full", progress=False, init_model=model)
    with pytest.raises(LmforgeError, match="cannot add LoRA to a run being resumed"):
        resume("full", lora=LORA)

"""Parity of lmforge's BERT with Hugging Face's, both directions, every supported head, tiny sizes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.errors import LmforgeError
from lmforge.interop import convert, hf_bert
from lmforge.tokenizer import Tokenizer, train_tokenizer
from tests.conftest import SAMPLE_TEXT
from tests.models.test_bert import padded_batch, tiny_bert

transformers = pytest.importorskip("transformers")

ARCHITECTURES = {
    "BertModel": "none",
    "BertForMaskedLM": "mlm",
    "BertForPreTraining": "pretraining",
    "BertForSequenceClassification": "classification",
    "BertForTokenClassification": "token-classification",
}
LABELS = {"0": "negative", "1": "neutral", "2": "positive"}


@pytest.fixture(scope="module")
def wordpiece():
    return train_tokenizer("wordpiece", [SAMPLE_TEXT], vocab_size=100)


def hf_bert_model(arch: str, vocab_size: int, **overrides):
    config = transformers.BertConfig(
        **{
            **dict(
                vocab_size=vocab_size,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=64,
                id2label=LABELS,
                label2id={v: int(k) for k, v in LABELS.items()},
            ),
            **overrides,
        }
    )
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # random norms and biases too, so that a swapped name cannot hide
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def hf_outputs(model, batch) -> dict[str, torch.Tensor]:
    out = model(**batch, output_hidden_states=True)
    found = {"hidden_states": out.hidden_states[-1]}
    pooled = getattr(model, "bert", model)(**batch).pooler_output  # head models do not return it
    if pooled is not None:
        found["pooled"] = pooled
    if hasattr(out, "prediction_logits"):
        found["mlm_logits"], found["nsp_logits"] = (
            out.prediction_logits,
            out.seq_relationship_logits,
        )
    elif type(model).__name__ == "BertForMaskedLM":
        found["mlm_logits"] = out.logits
    elif hasattr(out, "logits"):
        found["logits"] = out.logits
    return found


def assert_parity(ours, theirs: dict[str, torch.Tensor]) -> None:
    for field, expected in theirs.items():
        got = getattr(ours, field)
        assert got is not None, field
        assert (got - expected).abs().max().item() <= 1e-5, field
    for field in ("pooled", "mlm_logits", "nsp_logits", "logits"):
        assert (getattr(ours, field) is None) == (field not in theirs), field


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hf_to_lmforge_outputs_match(tmp_path, wordpiece, arch):
    hf = hf_bert_model(arch, wordpiece.vocab_size)
    hf.save_pretrained(tmp_path / "hf")
    wordpiece.save(tmp_path / "hf")

    ckpt = load_checkpoint(tmp_path / "hf")  # HF folder converted on the fly
    assert ckpt.model.config.head == ARCHITECTURES[arch]
    assert ckpt.meta["converted_from"]["format"] == "hf-bert"
    batch = padded_batch(wordpiece.vocab_size)
    with torch.no_grad():
        assert_parity(ckpt.model(**batch), hf_outputs(hf, batch))
    if ckpt.model.config.head in ("classification", "token-classification"):
        assert ckpt.model.config.labels == list(LABELS.values())

    # through an lmforge checkpoint and back: the same tensors and labels
    assert "lmforge checkpoint" in convert(tmp_path / "hf", tmp_path / "lm")
    assert "Hugging Face bert folder" in convert(tmp_path / "lm", tmp_path / "back")
    original, back = (
        load_file(tmp_path / "hf" / "model.safetensors"),
        load_file(tmp_path / "back" / "model.safetensors"),
    )
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == [arch] and config["model_type"] == "bert"
    if "Classification" in arch:
        assert config["id2label"] == LABELS


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lmforge_to_hf_outputs_match(tmp_path, wordpiece, arch):
    head = ARCHITECTURES[arch]
    model = tiny_bert(
        wordpiece.vocab_size, head=head, labels=["a", "b", "c"], activation="gelu_tanh"
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    save_checkpoint(tmp_path / "lm", model, wordpiece)
    convert(tmp_path / "lm", tmp_path / "hf")
    assert (tmp_path / "hf" / "vocab.txt").is_file()

    hf = getattr(transformers, arch).from_pretrained(tmp_path / "hf").eval()
    assert hf.config.hidden_act == "gelu_new"
    batch = padded_batch(wordpiece.vocab_size)
    with torch.no_grad():
        assert_parity(model(**batch), hf_outputs(hf, batch))
    if "Classification" in arch:
        assert hf.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_exported_tokenizer_works_in_transformers(tmp_path, wordpiece):
    save_checkpoint(tmp_path / "lm", tiny_bert(wordpiece.vocab_size, head="mlm"), wordpiece)
    convert(tmp_path / "lm", tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts, pairs = ["The quick brown fox.", "Pack my box!"], ["A lazy dog", "with five jugs"]
    ours = wordpiece.encode_for_encoder(texts, pairs)
    theirs = hf_tok(texts, pairs, padding=True, return_tensors="pt")
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    assert hf_tok.mask_token == "[MASK]"


def test_vocab_txt_only_folder_matches_hf_bert_tokenizer(tmp_path, wordpiece):
    wordpiece.backend.model.save(str(tmp_path))  # vocab.txt alone, as in old BERT releases
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    ours = Tokenizer.load(tmp_path)
    theirs = transformers.BertTokenizer(vocab=str(tmp_path / "vocab.txt"), do_lower_case=True)
    texts = ["The QUICK brown fox [MASK] jumps.", "Naïve café: zebras!"]
    assert ours.kind == "wordpiece" and ours.mask_token == "[MASK]"
    expected = theirs(texts, padding=True, return_tensors="pt")
    assert torch.equal(ours.encode_for_encoder(texts)["input_ids"], expected["input_ids"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(position_embedding_type="relative_key"), "position_embedding_type='relative_key'"),
        (dict(is_decoder=True), "is_decoder=True"),
        (dict(hidden_act="silu"), "hidden_act='silu'"),
        (dict(architectures=["BertForQuestionAnswering"]), "BertForQuestionAnswering"),
    ],
)
def test_unsupported_hf_options_are_refused(tmp_path, wordpiece, overrides, message):
    hf = hf_bert_model("BertModel", wordpiece.vocab_size)
    hf.save_pretrained(tmp_path)
    wordpiece.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **overrides}))
    with pytest.raises(LmforgeError, match=message.replace("[", r"\[")):
        load_checkpoint(tmp_path)


def test_weights_that_do_not_fit_are_named(tmp_path, wordpiece):
    hf = hf_bert_model("BertForSequenceClassification", wordpiece.vocab_size)
    hf.save_pretrained(tmp_path)
    wordpiece.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps({**config, "architectures": ["BertForMaskedLM"]})
    )
    with pytest.raises(LmforgeError, match="missing 'cls.predictions"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(norm_position="pre"), "norm_position"),
        (dict(activation="swiglu"), "activation"),
        (dict(n_kv_head=1), "n_kv_head"),
        (dict(bias=False), "bias"),
    ],
)
def test_unexportable_models_are_refused(tmp_path, wordpiece, overrides, field):
    model = tiny_bert(wordpiece.vocab_size, **overrides)
    with pytest.raises(LmforgeError, match=f"cannot be exported as Hugging Face BERT: .*{field}"):
        hf_bert.save(tmp_path / "hf", model, wordpiece)


def test_bare_model_over_head_files_ignores_the_heads(tmp_path, wordpiece):
    """A BertModel config over BertForPreTraining files, as HF's own loading allows."""
    hf = hf_bert_model("BertForPreTraining", wordpiece.vocab_size)
    hf.save_pretrained(tmp_path)
    wordpiece.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    ckpt = load_checkpoint(tmp_path)
    batch = padded_batch(wordpiece.vocab_size)
    with torch.no_grad():
        theirs = hf.bert(**batch)
        ours = ckpt.model(**batch)
    assert (ours.hidden_states - theirs.last_hidden_state).abs().max() <= 1e-5
    assert (ours.pooled - theirs.pooler_output).abs().max() <= 1e-5

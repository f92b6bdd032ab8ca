"""Hugging Face BERT (`BertModel` and its task heads) <-> lmforge `Bert`: config mapping and weight names.

config.json's `architectures` picks the head:

    BertModel -> "none"   BertForMaskedLM -> "mlm"   BertForPreTraining -> "pretraining"
    BertForSequenceClassification -> "classification"   BertForTokenClassification -> "token-classification"

The weights map one to one through the table `weight_names`, with three differences:
- HF keeps separate `query`/`key`/`value` Linear layers; lmforge's shared attention has one fused
  `c_attn`, so they are concatenated (in that order, along the output dimension) on import and
  split on export;
- the MLM decoder is the word embedding matrix in both (HF leaves the tied tensor out of its files);
- HF prefixes the backbone with `bert.` in head models but not in a bare `BertModel`; old files
  carry `position_ids` buffers and TF-era `gamma`/`beta` LayerNorm names.

Only `torch` and `safetensors` are used: `transformers` need not be installed to convert.
Only BERT's own architecture is expressible (post-norm LayerNorm with biases, learned absolute
positions, multi-head attention); anything else is refused with the reason, never approximated.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmforge.checkpoint import (
    WEIGHTS_FILE,
    Checkpoint,
    weights_state_dict,
)
from lmforge.config import from_dict
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir
from lmforge.interop.hf_gpt2 import (
    ACTIVATION_TO_HF,
    HF_TO_ACTIVATION,
    converted_checkpoint,
    read_hf_weights,
)
from lmforge.models.bert import Bert, BertConfig
from lmforge.tokenizer import Tokenizer

MODEL_TYPE = "bert"
CONFIG_FILE = "config.json"
ARCHITECTURE_TO_HEAD = {
    "BertModel": "none",
    "BertForMaskedLM": "mlm",
    "BertForPreTraining": "pretraining",
    "BertForSequenceClassification": "classification",
    "BertForTokenClassification": "token-classification",
}
HEAD_TO_ARCHITECTURE = {head: arch for arch, head in ARCHITECTURE_TO_HEAD.items()}
# HF BERT options lmforge's model does not implement: (key, value lmforge needs, why).
UNSUPPORTED_OPTIONS = (
    ("position_embedding_type", "absolute", "relative position embeddings"),
    ("is_decoder", False, "causal (decoder) attention"),
    ("add_cross_attention", False, "cross-attention layers"),
)
# Tensors HF writes that lmforge rebuilds (index buffers) or holds once (the tied MLM decoder).
DERIVED = (
    "bert.embeddings.position_ids",
    "bert.embeddings.token_type_ids",
    "cls.predictions.decoder.weight",
)


# Head tensors a file may hold that the architecture does not use; HF skips them too (a bare
# BertModel over any head's files, bert-base-uncased's BertForMaskedLM files with their NSP layer).
IGNORED_HEADS = {
    "none": ("cls.", "classifier."),
    "mlm": ("cls.seq_relationship.",),
    "pretraining": (),
    "classification": (),
    "token-classification": (),
}


# --- config --------------------------------------------------------------------------------------
def config_from_hf(hf: dict[str, Any], where: str) -> BertConfig:
    """lmforge BertConfig for an HF BERT config.json dict; `where` names the folder in errors."""
    for key, needed, what in UNSUPPORTED_OPTIONS:
        if hf.get(key, needed) != needed:
            raise LmforgeError(
                f"{where}: {key}={hf[key]!r} ({what}) is not supported by lmforge; "
                f"only BERT checkpoints with {key}={needed!r} can be converted"
            )
    arch = (hf.get("architectures") or ["BertModel"])[0]
    if arch not in ARCHITECTURE_TO_HEAD:
        raise LmforgeError(
            f"{where}: architecture {arch!r} is not supported; lmforge reads: {', '.join(ARCHITECTURE_TO_HEAD)}"
        )
    head = ARCHITECTURE_TO_HEAD[arch]
    if head in ("mlm", "pretraining") and not hf.get("tie_word_embeddings", True):
        raise LmforgeError(
            f"{where}: tie_word_embeddings=false (an MLM decoder apart from the embeddings) is not supported"
        )
    act = hf.get("hidden_act", "gelu")
    if act not in HF_TO_ACTIVATION:
        raise LmforgeError(
            f"{where}: hidden_act={act!r} is not supported; lmforge reads: {', '.join(map(repr, HF_TO_ACTIVATION))}"
        )
    needed = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
    )
    missing = [k for k in needed if k not in hf]
    if missing:
        raise LmforgeError(
            f"{where}: config.json lacks {', '.join(missing)}, which a BERT config needs"
        )
    labels: list[str] = []
    num_labels = 2
    if head in ("classification", "token-classification"):
        id2label = hf.get("id2label") or {}
        num_labels = len(id2label) or hf.get("num_labels", 2)
        labels = [id2label[k] for k in sorted(id2label, key=int)]
        if labels == [f"LABEL_{i}" for i in range(num_labels)]:
            labels = []  # HF's placeholder names: the labels were never named
    return from_dict(
        BertConfig,
        dict(
            vocab_size=hf["vocab_size"],
            max_position=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"],
            n_embd=hf["hidden_size"],
            mlp_hidden=hf["intermediate_size"],
            norm_eps=hf.get("layer_norm_eps", 1e-12),
            activation=HF_TO_ACTIVATION[act],
            # lmforge has one dropout rate; BERT checkpoints use 0.1 for both of theirs
            dropout=hf.get("hidden_dropout_prob", 0.1),
            pad_token_id=hf.get("pad_token_id", 0),
            head=head,
            num_labels=num_labels,
            labels=labels,
            classifier_dropout=hf.get("classifier_dropout"),
        ),
        section="model",
    )


def check_exportable(c: BertConfig) -> None:
    """Refuse configs HF BERT cannot express, naming each field and the value BERT needs."""
    needed = dict(
        norm="layernorm", norm_position="post", position="learned", bias=True, n_kv_head=c.n_head
    )
    wrong = [
        f"{k}={getattr(c, k)!r} (BERT needs {v!r})" for k, v in needed.items() if getattr(c, k) != v
    ]
    if c.activation not in ACTIVATION_TO_HF:
        wrong.append(
            f"activation={c.activation!r} (BERT needs one of {', '.join(map(repr, ACTIVATION_TO_HF))})"
        )
    if c.n_head * c.head_dim != c.n_embd:  # e.g. after head pruning, which keeps the head size
        wrong.append(
            f"head_size={c.head_size} with n_head={c.n_head} (BERT needs heads that split n_embd="
            f"{c.n_embd} evenly)"
        )
    if wrong:
        raise LmforgeError(
            f"this model cannot be exported as Hugging Face BERT: {'; '.join(wrong)}"
        )


def config_to_hf(c: BertConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json as `save_pretrained` writes it for the head's architecture."""
    dtype_name = str(dtype).removeprefix("torch.")
    hf = {
        "architectures": [HEAD_TO_ARCHITECTURE[c.head]],
        "model_type": MODEL_TYPE,
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "intermediate_size": c.mlp_hidden,
        "hidden_act": ACTIVATION_TO_HF[c.activation],
        "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": c.dropout,
        "max_position_embeddings": c.max_position,
        "type_vocab_size": c.type_vocab_size,
        "initializer_range": 0.02,
        "layer_norm_eps": c.norm_eps,
        "pad_token_id": c.pad_token_id,
        "position_embedding_type": "absolute",
        "classifier_dropout": c.classifier_dropout,
        "is_decoder": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        # transformers >= 5 reads "dtype", 4.x "torch_dtype"
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
    if c.head in ("classification", "token-classification"):
        names = c.labels or [f"LABEL_{i}" for i in range(c.num_labels)]
        hf["id2label"] = {str(i): name for i, name in enumerate(names)}
        hf["label2id"] = {name: i for i, name in enumerate(names)}
    return hf


# --- weights -------------------------------------------------------------------------------------
def _linear(ours: str, theirs: str) -> list[tuple[str, str]]:
    return [(f"{ours}.weight", f"{theirs}.weight"), (f"{ours}.bias", f"{theirs}.bias")]


def weight_names(c: BertConfig) -> list[tuple[str, str | tuple[str, str, str]]]:
    """(lmforge name, HF name) for every tensor; a fused c_attn pairs with (query, key, value).

    HF names carry the `bert.` prefix of the head models; a bare BertModel drops it."""
    names = [
        ("embeddings.word.weight", "bert.embeddings.word_embeddings.weight"),
        ("embeddings.position.weight", "bert.embeddings.position_embeddings.weight"),
        ("embeddings.token_type.weight", "bert.embeddings.token_type_embeddings.weight"),
        *_linear("embeddings.ln", "bert.embeddings.LayerNorm"),
    ]
    for i in range(c.n_layer):
        ours, hf = f"h.{i}.", f"bert.encoder.layer.{i}."
        for w in ("weight", "bias"):
            qkv = tuple(f"{hf}attention.self.{n}.{w}" for n in ("query", "key", "value"))
            names.append((f"{ours}attn.c_attn.{w}", qkv))
        names += _linear(ours + "attn.c_proj", hf + "attention.output.dense")
        names += _linear(ours + "ln_1", hf + "attention.output.LayerNorm")
        names += _linear(ours + "mlp.c_fc", hf + "intermediate.dense")
        names += _linear(ours + "mlp.c_proj", hf + "output.dense")
        names += _linear(ours + "ln_2", hf + "output.LayerNorm")
    if c.pooler:
        names += _linear("pooler", "bert.pooler.dense")
    if c.head in ("mlm", "pretraining"):
        names += _linear("mlm.dense", "cls.predictions.transform.dense")
        names += _linear("mlm.ln", "cls.predictions.transform.LayerNorm")
        names.append(("mlm.bias", "cls.predictions.bias"))
    if c.head == "pretraining":
        names += _linear("nsp", "cls.seq_relationship")
    if c.head in ("classification", "token-classification"):
        names += _linear("classifier", "classifier")
    return names


def _normalise_hf_names(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Head-model names throughout: `bert.` prefix added, TF-era gamma/beta renamed."""
    out = {}
    for name, t in hf.items():
        if name.startswith(("embeddings.", "encoder.", "pooler.")):
            name = "bert." + name  # saved from a bare BertModel
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
            "LayerNorm.beta", "LayerNorm.bias"
        )
        out[name] = t
    return out


def state_dict_from_hf(
    hf: dict[str, torch.Tensor], c: BertConfig, where: str
) -> dict[str, torch.Tensor]:
    """HF BERT tensors -> lmforge names; errors name what is missing or left over."""
    hf = _normalise_hf_names(hf)
    if "cls.predictions.bias" not in hf and "cls.predictions.decoder.bias" in hf:
        hf["cls.predictions.bias"] = hf["cls.predictions.decoder.bias"]  # the same tensor, tied
    hf.pop("cls.predictions.decoder.bias", None)
    out, used = {}, set()
    for ours, theirs in weight_names(c):
        parts = theirs if isinstance(theirs, tuple) else (theirs,)
        missing = [p for p in parts if p not in hf]
        if missing:
            raise LmforgeError(
                f"{where}: weights do not fit the BERT config (head {c.head!r}): missing {missing[0]!r}"
            )
        out[ours] = torch.cat([hf[p] for p in parts]) if len(parts) > 1 else hf[parts[0]]
        used.update(parts)
    left = sorted(
        k for k in set(hf) - used if k not in DERIVED and not k.startswith(IGNORED_HEADS[c.head])
    )
    if left:
        raise LmforgeError(
            f"{where}: weights do not fit the BERT config (head {c.head!r}): unexpected {left[:3]}"
        )
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], c: BertConfig) -> dict[str, torch.Tensor]:
    """lmforge tensors -> HF BERT names (a bare BertModel without the `bert.` prefix)."""
    out = {}
    for ours, theirs in weight_names(c):
        if isinstance(theirs, tuple):
            for name, t in zip(theirs, sd[ours].chunk(3), strict=True):
                out[name] = t.contiguous()
        else:
            out[theirs] = sd[ours].contiguous()
    if c.head == "none":
        out = {k.removeprefix("bert."): t for k, t in out.items()}
    return out


# --- folders -------------------------------------------------------------------------------------
def load(directory: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Read an HF BERT folder (config.json, weights, tokenizer) into an lmforge Checkpoint."""
    directory = Path(directory)
    where = str(directory)
    hf = read_hf_weights(directory)
    config = config_from_hf(json.loads((directory / CONFIG_FILE).read_text()), where)
    # a pooler is kept whenever the file has one (bert-base's MLM files do, HF's BertForMaskedLM
    # saves none), so converting back writes the same tensors
    has_pooler = any(k.endswith("pooler.dense.weight") for k in hf)
    if has_pooler != config.pooler:
        config = from_dict(BertConfig, {**asdict(config), "pooler": has_pooler}, section="model")
    weights = state_dict_from_hf(hf, config, where)
    return converted_checkpoint(Bert(config), weights, directory, "bert", "hf-bert", device)


def save(directory: str | Path, model: Bert, tokenizer: Tokenizer) -> Path:
    """Write `save_pretrained`'s layout: config.json, model.safetensors and the tokenizer (with
    vocab.txt for WordPiece), atomically (a crash leaves any previous folder intact)."""
    c = model.config
    check_exportable(c)
    dtype = model.embeddings.word.weight.dtype
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        save_file(
            state_dict_to_hf(weights_state_dict(model), c),
            str(tmp / WEIGHTS_FILE),
            metadata={"format": "pt"},
        )
        (tmp / CONFIG_FILE).write_text(json.dumps(config_to_hf(c, dtype), indent=2) + "\n")
        tokenizer.save(tmp)
    return directory

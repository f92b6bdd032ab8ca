"""Hugging Face GPT-2 (`GPT2LMHeadModel`) <-> lmforge `GPT`: config mapping and weight names.

lmforge's GPT uses GPT-2's module names, so the weights map one to one with two differences:
- HF GPT-2 stores its projections in `Conv1D` layers, whose weight is the transpose of an
  `nn.Linear` weight: (in, out) instead of (out, in). The four projections per layer
  (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`) are transposed on the way in and out;
- HF leaves a tied `lm_head.weight` out of `model.safetensors` (it is `transformer.wte.weight`),
  and old checkpoints saved from `GPT2Model` have no `transformer.` prefix and carry the causal
  mask as buffers (`attn.bias`, `attn.masked_bias`).

Only `torch` and `safetensors` are used: `transformers` need not be installed to convert.
Only GPT-2's own architecture is expressible: pre-norm LayerNorm with biases, learned positions,
multi-head attention and a plain MLP. Anything else is refused with the reason, never
approximated.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmforge.checkpoint import (
    FORMAT_VERSION,
    WEIGHTS_FILE,
    Checkpoint,
    copy_weights,
    weights_state_dict,
)
from lmforge.config import from_dict
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.tokenizer import Tokenizer

MODEL_TYPE = "gpt2"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
INDEX_FILE = "model.safetensors.index.json"  # sharded safetensors: {"weight_map": {name: shard}}
PICKLE_FILE = "pytorch_model.bin"

# The weights HF stores in Conv1D layers, (in, out): transposed relative to nn.Linear.
CONV1D_SUFFIXES = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
# Causal-mask buffers that old GPT-2 checkpoints carry; lmforge builds its masks on the fly.
MASK_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")

# HF activation_function -> lmforge activation. "gelu_new", "gelu_pytorch_tanh" and "gelu_fast"
# are the same tanh approximation of GELU (Hendrycks & Gimpel 2016), computed three ways.
HF_TO_ACTIVATION = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}
ACTIVATION_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}

# HF GPT-2 options lmforge's attention does not implement: (key, value lmforge needs, why).
UNSUPPORTED_OPTIONS = (
    ("scale_attn_weights", True, "attention without the 1/sqrt(head_dim) scale"),
    ("scale_attn_by_inverse_layer_idx", False, "attention scaled by 1/(layer index + 1)"),
    ("reorder_and_upcast_attn", False, "reordered, upcast attention"),
    ("add_cross_attention", False, "cross-attention layers"),
)


# --- config --------------------------------------------------------------------------------------
def config_from_hf(hf: dict[str, Any], where: str) -> GPTConfig:
    """lmforge GPTConfig for an HF GPT-2 config.json dict; `where` names the folder in errors."""
    for key, needed, what in UNSUPPORTED_OPTIONS:
        if hf.get(key, needed) != needed:
            raise LmforgeError(
                f"{where}: {key}={hf[key]!r} ({what}) is not supported by lmforge; "
                f"only GPT-2 checkpoints with {key}={needed!r} can be converted"
            )
    act = hf.get("activation_function", "gelu_new")
    if act not in HF_TO_ACTIVATION:
        raise LmforgeError(
            f"{where}: activation_function={act!r} is not supported; "
            f"lmforge reads: {', '.join(map(repr, HF_TO_ACTIVATION))}"
        )
    missing = [
        k for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head") if k not in hf
    ]
    if missing:
        raise LmforgeError(
            f"{where}: config.json lacks {', '.join(missing)}, which a GPT-2 config needs"
        )
    # lmforge has one dropout rate for embeddings, attention and residuals; GPT-2 checkpoints
    # use one value for all three, and it only matters when fine-tuning.
    dropout = hf.get("resid_pdrop", 0.1)
    return from_dict(
        GPTConfig,
        dict(
            vocab_size=hf["vocab_size"],
            block_size=hf["n_positions"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            mlp_hidden=hf.get("n_inner"),  # None: 4 * n_embd, as in HF
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            activation=HF_TO_ACTIVATION[act],
            dropout=dropout,
            tie_embeddings=hf.get("tie_word_embeddings", True),
        ),
        section="model",
    )


def check_exportable(c: GPTConfig) -> None:
    """Refuse configs HF GPT-2 cannot express, naming each field and the value GPT-2 needs."""
    needed = dict(
        norm="layernorm", norm_position="pre", position="learned", bias=True, n_kv_head=c.n_head
    )
    wrong = [
        f"{k}={getattr(c, k)!r} (GPT-2 needs {v!r})"
        for k, v in needed.items()
        if getattr(c, k) != v
    ]
    if c.activation not in ACTIVATION_TO_HF:
        wrong.append(
            f"activation={c.activation!r} (GPT-2 needs one of {', '.join(map(repr, ACTIVATION_TO_HF))})"
        )
    if c.n_head * c.head_dim != c.n_embd:  # e.g. after head pruning, which keeps the head size
        wrong.append(
            f"head_size={c.head_size} with n_head={c.n_head} (GPT-2 needs heads that split n_embd="
            f"{c.n_embd} evenly)"
        )
    if wrong:
        raise LmforgeError(
            f"this model cannot be exported as Hugging Face GPT-2: {'; '.join(wrong)}"
        )


def config_to_hf(c: GPTConfig, tokenizer: Tokenizer, dtype: torch.dtype) -> dict[str, Any]:
    """config.json as `GPT2LMHeadModel.save_pretrained` writes it."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": MODEL_TYPE,
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None if c.mlp_hidden == 4 * c.n_embd else c.mlp_hidden,
        "activation_function": ACTIVATION_TO_HF[c.activation],
        "layer_norm_epsilon": c.norm_eps,
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "use_cache": True,
        # transformers >= 5 reads "dtype", 4.x "torch_dtype"
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


# --- weights -------------------------------------------------------------------------------------
def _is_conv1d(name: str) -> bool:
    return name.endswith(CONV1D_SUFFIXES)


def state_dict_from_hf(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors -> lmforge names and layouts (a tied lm_head stays absent)."""
    out = {}
    for name, t in hf.items():
        if name.endswith(MASK_BUFFER_SUFFIXES):
            continue
        if name != "lm_head.weight" and not name.startswith("transformer."):
            name = "transformer." + name  # saved from GPT2Model, without the LM head wrapper
        out[name] = t.t() if _is_conv1d(name) else t
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """lmforge tensors -> HF GPT-2 names and layouts; a tied lm_head is left out, as HF saves it."""
    out = {}
    for name, t in sd.items():
        if name == "lm_head.weight" and tie_embeddings:
            continue
        out[name] = (t.t() if _is_conv1d(name) else t).contiguous()
    return out


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """model.safetensors (single or sharded), else pytorch_model.bin read without running pickled code."""
    if (directory / WEIGHTS_FILE).is_file():
        return load_file(str(directory / WEIGHTS_FILE))
    if (directory / INDEX_FILE).is_file():
        shards = sorted(
            set(json.loads((directory / INDEX_FILE).read_text())["weight_map"].values())
        )
        return {k: v for shard in shards for k, v in load_file(str(directory / shard)).items()}
    if (directory / PICKLE_FILE).is_file():
        try:
            return torch.load(directory / PICKLE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:
            raise LmforgeError(
                f"{directory / PICKLE_FILE} could not be read safely (weights only): {e}".replace(
                    "\n", " "
                )
            ) from e
    raise LmforgeError(
        f"no weights in {str(directory)!r}: expected {WEIGHTS_FILE}, {INDEX_FILE} or {PICKLE_FILE}"
    )


# --- folders -------------------------------------------------------------------------------------
def load(directory: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Read an HF GPT-2 folder (config.json, weights, tokenizer) into an lmforge Checkpoint."""
    directory = Path(directory)
    hf_config = json.loads((directory / CONFIG_FILE).read_text())
    config = config_from_hf(hf_config, str(directory))
    weights = state_dict_from_hf(read_hf_weights(directory))
    return converted_checkpoint(GPT(config), weights, directory, "gpt", "hf-gpt2", device)


def converted_checkpoint(
    model: torch.nn.Module,
    weights: dict[str, torch.Tensor],
    directory: Path,
    model_type: str,
    source_format: str,
    device: str | torch.device,
) -> Checkpoint:
    """The lmforge Checkpoint of a model read from an HF folder: `weights` (already in lmforge's
    names) copied in strictly, and the meta sections `save_checkpoint` writes, so code reading
    `meta["model"]` works on converted and native checkpoints alike."""
    copy_weights(model, weights, f"weights in {str(directory)!r}")
    model.to(device).eval()
    meta = {
        "format_version": FORMAT_VERSION,
        "model_type": model_type,
        "model": asdict(model.config),
        "converted_from": {"format": source_format, "path": str(directory)},
    }
    return Checkpoint(model=model, tokenizer=Tokenizer.load(directory), meta=meta, path=directory)


def save(directory: str | Path, model: GPT, tokenizer: Tokenizer) -> Path:
    """Write `save_pretrained`'s layout: config.json, model.safetensors, generation_config.json
    and the tokenizer, atomically (a crash leaves any previous folder intact)."""
    check_exportable(model.config)
    sd = weights_state_dict(model)
    dtype = model.transformer.wte.weight.dtype
    generation = {
        "_from_model_config": True,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
    }
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        save_file(
            state_dict_to_hf(sd, model.config.tie_embeddings),
            str(tmp / WEIGHTS_FILE),
            metadata={"format": "pt"},
        )
        hf_config = config_to_hf(model.config, tokenizer, dtype)
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer.save(tmp)
    return directory

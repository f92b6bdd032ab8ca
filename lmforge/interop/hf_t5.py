"""Hugging Face T5 (`T5ForConditionalGeneration`) <-> lmforge `EncoderDecoder`: config mapping and weight names.

T5 is lmforge's encoder-decoder with T5's settings: pre-norm RMSNorm without biases, relative
position bias, unscaled attention, unscaled and shared token embeddings. The weights map one to
one through the table `weight_names`, with these differences:
- HF keeps separate `q`/`k`/`v` projections; lmforge's shared attention has one fused `c_attn`,
  so they are concatenated (in that order, along the output dimension) on import and split on
  export, in self- and cross-attention alike. A gated FFN's `wi_0` (gate) and `wi_1` (up) are
  stacked the same way into `mlp.c_fc`;
- HF stores the relative position bias in layer 0 of each stack, lmforge on the stack;
- the token table is HF's `shared` (its `embed_tokens` are the same tensor, not saved).

Output projection: T5 v1.0 ties `lm_head` to `shared` and multiplies the decoder output by
d_model**-0.5 first; v1.1 unties and does not. transformers 4 read both from
`tie_word_embeddings`; transformers 5 always ties unless the file holds a different
`lm_head.weight`, and reads the rescale from `scale_decoder_outputs`. So on import the file
decides the tying (`tie_embeddings`) and `scale_decoder_outputs` (else `tie_word_embeddings`) the
rescale (`scale_decoder_output`); export writes both keys.

Only `torch` and `safetensors` are used: `transformers` need not be installed to convert.
Only T5's own architecture is expressible; anything else is refused with the reason.
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
from lmforge.interop.hf_gpt2 import converted_checkpoint, read_hf_weights
from lmforge.models.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from lmforge.tokenizer import Tokenizer

MODEL_TYPE = "t5"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
ARCHITECTURES = ("T5ForConditionalGeneration", "T5WithLMHeadModel")  # the second: its old name
# HF feed_forward_proj -> lmforge activation. "gated-gelu" (T5 v1.1) uses GELU's tanh
# approximation ("gelu_new"), plain "gelu" the exact one.
FEED_FORWARD_TO_ACTIVATION = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gated-gelu": "geglu",
    "gated-silu": "swiglu",
}
ACTIVATION_TO_FEED_FORWARD = {act: ff for ff, act in FEED_FORWARD_TO_ACTIVATION.items()}
# Tensors HF files may hold that lmforge does not: `embed_tokens` are `shared`, and old files
# carry a relative bias for cross-attention that T5 never uses.
DERIVED = (
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
)


# --- config --------------------------------------------------------------------------------------
def config_from_hf(hf: dict[str, Any], where: str) -> EncoderDecoderConfig:
    """lmforge config for an HF T5 config.json dict; `where` names the folder in errors."""
    arch = (hf.get("architectures") or [ARCHITECTURES[0]])[0]
    if arch not in ARCHITECTURES:
        raise LmforgeError(
            f"{where}: architecture {arch!r} is not supported; lmforge reads: {', '.join(ARCHITECTURES)}"
        )
    if not hf.get("is_encoder_decoder", True) or hf.get("is_decoder", False):
        raise LmforgeError(f"{where}: only the full encoder-decoder T5 can be converted, not one stack")
    ff = hf.get("feed_forward_proj", "relu")
    if ff not in FEED_FORWARD_TO_ACTIVATION:
        raise LmforgeError(
            f"{where}: feed_forward_proj={ff!r} is not supported; lmforge reads: "
            f"{', '.join(map(repr, FEED_FORWARD_TO_ACTIVATION))}"
        )
    needed = ("vocab_size", "d_model", "d_ff", "num_layers", "num_heads")
    missing = [k for k in needed if k not in hf]
    if missing:
        raise LmforgeError(f"{where}: config.json lacks {', '.join(missing)}, which a T5 config needs")
    d_kv = hf.get("d_kv", 64)
    tied = hf.get("tie_word_embeddings", True) is not False
    pad = hf.get("pad_token_id", 0)
    start = hf.get("decoder_start_token_id")
    eos = hf.get("eos_token_id", 1)
    if isinstance(eos, list):  # generation may stop at several; the first is the sequence end
        eos = eos[0] if eos else None
    # lmforge has one dropout rate (and T5's FFN dropout) where HF has dropout_rate
    dropout = hf.get("dropout_rate", 0.1)
    return from_dict(
        EncoderDecoderConfig,
        dict(
            vocab_size=hf["vocab_size"],
            n_layer=hf["num_layers"],
            n_decoder_layer=hf.get("num_decoder_layers") or hf["num_layers"],
            n_head=hf["num_heads"],
            n_embd=hf["d_model"],
            head_size=None if d_kv * hf["num_heads"] == hf["d_model"] else d_kv,
            mlp_hidden=hf["d_ff"],
            activation=FEED_FORWARD_TO_ACTIVATION[ff],
            dropout=dropout,
            activation_dropout=dropout,
            norm="rmsnorm",
            norm_position="pre",
            norm_eps=hf.get("layer_norm_epsilon", 1e-6),
            bias=False,
            position="relative",
            relative_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_max_distance=hf.get("relative_attention_max_distance", 128),
            max_position=hf.get("n_positions", 512),
            share_embeddings=True,
            tie_embeddings=tied,
            scale_embeddings=False,
            scale_attn=False,
            scale_decoder_output=hf.get("scale_decoder_outputs", tied),
            pad_token_id=pad,
            decoder_start_token_id=pad if start is None else start,
            eos_token_id=eos,
        ),
        section="model",
    )


def check_exportable(c: EncoderDecoderConfig) -> None:
    """Refuse configs HF T5 cannot express, naming each field and the value T5 needs."""
    needed = dict(
        norm="rmsnorm", norm_position="pre", position="relative", bias=False, n_kv_head=c.n_head,
        share_embeddings=True, scale_embeddings=False, scale_attn=False,
    )
    wrong = [f"{k}={getattr(c, k)!r} (T5 needs {v!r})" for k, v in needed.items() if getattr(c, k) != v]
    if c.activation not in ACTIVATION_TO_FEED_FORWARD:
        wrong.append(
            f"activation={c.activation!r} (T5 needs one of {', '.join(map(repr, ACTIVATION_TO_FEED_FORWARD))})"
        )
    if wrong:
        raise LmforgeError(f"this model cannot be exported as Hugging Face T5: {'; '.join(wrong)}")


def config_to_hf(c: EncoderDecoderConfig, tokenizer: Tokenizer, dtype: torch.dtype) -> dict[str, Any]:
    """config.json as `T5ForConditionalGeneration.save_pretrained` writes it."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": MODEL_TYPE,
        "vocab_size": c.vocab_size,
        "d_model": c.n_embd,
        "d_kv": c.head_dim,
        "d_ff": c.mlp_hidden,
        "num_layers": c.n_layer,
        "num_decoder_layers": c.n_decoder_layer,
        "num_heads": c.n_head,
        "relative_attention_num_buckets": c.relative_buckets,
        "relative_attention_max_distance": c.relative_max_distance,
        "dropout_rate": c.dropout,
        "layer_norm_epsilon": c.norm_eps,
        "initializer_factor": 1.0,
        "feed_forward_proj": ACTIVATION_TO_FEED_FORWARD[c.activation],
        "is_encoder_decoder": True,
        "pad_token_id": c.pad_token_id,
        "eos_token_id": c.eos_token_id if c.eos_token_id is not None else tokenizer.eos_id,
        "decoder_start_token_id": c.decoder_start_token_id,
        # see the module docstring: transformers 4 reads the first, 5 both
        "tie_word_embeddings": c.tie_embeddings,
        "scale_decoder_outputs": c.scale_decoder_output,
        "use_cache": True,
        # transformers >= 5 reads "dtype", 4.x "torch_dtype"
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


# --- weights -------------------------------------------------------------------------------------
def _attention(ours: str, theirs: str) -> list[tuple[str, str | tuple[str, ...]]]:
    return [
        (f"{ours}.c_attn.weight", tuple(f"{theirs}.{n}.weight" for n in ("q", "k", "v"))),
        (f"{ours}.c_proj.weight", f"{theirs}.o.weight"),
    ]


def weight_names(c: EncoderDecoderConfig) -> list[tuple[str, str | tuple[str, ...]]]:
    """(lmforge name, HF name) for every tensor; a fused lmforge tensor pairs with a tuple of HF
    tensors stacked along the output dimension."""
    gated = c.activation in ("geglu", "swiglu")
    names: list[tuple[str, str | tuple[str, ...]]] = [("encoder.wte.weight", "shared.weight")]
    for stack, n_layer in (("encoder", c.n_layer), ("decoder", c.n_decoder_layer)):
        names.append(
            (f"{stack}.rel_bias.table.weight", f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        )
        for i in range(n_layer):
            ours, hf = f"{stack}.h.{i}.", f"{stack}.block.{i}.layer."
            names += _attention(ours + "attn", hf + "0.SelfAttention")
            names.append((ours + "ln_1.weight", hf + "0.layer_norm.weight"))
            ff = hf + "1."  # the encoder's layer 1 is its FFN, the decoder's its cross-attention
            if stack == "decoder":
                names += _attention(ours + "cross_attn", hf + "1.EncDecAttention")
                names.append((ours + "ln_cross.weight", hf + "1.layer_norm.weight"))
                ff = hf + "2."
            wi = (ff + "DenseReluDense.wi_0.weight", ff + "DenseReluDense.wi_1.weight")
            names.append((ours + "mlp.c_fc.weight", wi if gated else ff + "DenseReluDense.wi.weight"))
            names.append((ours + "mlp.c_proj.weight", ff + "DenseReluDense.wo.weight"))
            names.append((ours + "ln_2.weight", ff + "layer_norm.weight"))
        names.append((f"{stack}.ln_f.weight", f"{stack}.final_layer_norm.weight"))
    if not c.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight"))
    return names


def state_dict_from_hf(hf: dict[str, torch.Tensor], c: EncoderDecoderConfig, where: str) -> dict[str, torch.Tensor]:
    """HF T5 tensors -> lmforge names; errors name what is missing or left over."""
    hf = dict(hf)
    if "shared.weight" not in hf:  # some files keep the table only under a stack's name
        for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if name in hf:
                hf["shared.weight"] = hf[name]
                break
    if c.tie_embeddings:
        hf.pop("lm_head.weight", None)  # a copy of shared.weight when tied
    out, used = {}, set()
    for ours, theirs in weight_names(c):
        parts = theirs if isinstance(theirs, tuple) else (theirs,)
        missing = [p for p in parts if p not in hf]
        if missing:
            raise LmforgeError(f"{where}: weights do not fit the T5 config: missing {missing[0]!r}")
        out[ours] = torch.cat([hf[p] for p in parts]) if len(parts) > 1 else hf[parts[0]]
        used.update(parts)
    left = sorted(set(hf) - used - set(DERIVED))
    if left:
        raise LmforgeError(f"{where}: weights do not fit the T5 config: unexpected {left[:3]}")
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], c: EncoderDecoderConfig) -> dict[str, torch.Tensor]:
    """lmforge tensors -> HF T5 names, as `save_pretrained` writes them (tied tensors once)."""
    out = {}
    for ours, theirs in weight_names(c):
        if isinstance(theirs, tuple):
            for name, t in zip(theirs, sd[ours].chunk(len(theirs)), strict=True):
                out[name] = t.contiguous()
        else:
            out[theirs] = sd[ours].contiguous()
    return out


# --- folders -------------------------------------------------------------------------------------
def load(directory: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Read an HF T5 folder (config.json, weights, tokenizer) into an lmforge Checkpoint."""
    directory = Path(directory)
    where = str(directory)
    hf = read_hf_weights(directory)
    config = config_from_hf(json.loads((directory / CONFIG_FILE).read_text()), where)
    # the file decides the tying: a lm_head.weight of its own means untied (T5 v1.1), whatever
    # tie_word_embeddings says (transformers 5 writes true for both)
    shared = hf.get("shared.weight", hf.get("encoder.embed_tokens.weight"))
    tied = "lm_head.weight" not in hf or (shared is not None and torch.equal(hf["lm_head.weight"], shared))
    if tied != config.tie_embeddings:
        config = from_dict(EncoderDecoderConfig, {**asdict(config), "tie_embeddings": tied}, section="model")
    weights = state_dict_from_hf(hf, config, where)
    return converted_checkpoint(
        EncoderDecoder(config), weights, directory, "encoder-decoder", "hf-t5", device
    )


def save(directory: str | Path, model: EncoderDecoder, tokenizer: Tokenizer) -> Path:
    """Write `save_pretrained`'s layout: config.json, model.safetensors, generation_config.json
    and the tokenizer, atomically (a crash leaves any previous folder intact)."""
    c = model.config
    check_exportable(c)
    dtype = model.encoder.wte.weight.dtype
    hf_config = config_to_hf(c, tokenizer, dtype)
    generation = {
        "_from_model_config": True,
        "decoder_start_token_id": c.decoder_start_token_id,
        "eos_token_id": hf_config["eos_token_id"],
        "pad_token_id": c.pad_token_id,
    }
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        save_file(state_dict_to_hf(weights_state_dict(model), c), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer.save(tmp)
    return directory

"""Conversion between lmforge checkpoints and other formats, one small adapter module per format.

Hugging Face folders are told apart from lmforge checkpoints by their config.json: lmforge writes
a "format_version", Hugging Face a "model_type" such as "gpt2", "bert" or "t5". `convert` reads the direction
from SRC; `load_hf_checkpoint` lets `lmforge.checkpoint.load_checkpoint` open HF folders directly.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from lmforge.checkpoint import (
    CONFIG_FILE,
    Checkpoint,
    load_checkpoint,
    read_meta,
    resolve_checkpoint_dir,
    save_checkpoint,
)
from lmforge.errors import LmforgeError
from lmforge.interop import hf_bert, hf_gpt2, hf_t5

# HF config.json model_type -> adapter reading such folders
HF_IMPORTERS: dict[str, ModuleType] = {
    hf_gpt2.MODEL_TYPE: hf_gpt2,
    hf_bert.MODEL_TYPE: hf_bert,
    hf_t5.MODEL_TYPE: hf_t5,
}
# lmforge model_type -> adapter writing it as an HF folder
HF_EXPORTERS: dict[str, ModuleType] = {"gpt": hf_gpt2, "bert": hf_bert, "encoder-decoder": hf_t5}


def load_hf_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a Hugging Face model folder as an lmforge Checkpoint (weights converted in memory)."""
    directory = Path(directory)
    meta = read_meta(directory)
    model_type = meta.get("model_type")
    if model_type not in HF_IMPORTERS:
        raise LmforgeError(
            f"{str(directory)!r} is a Hugging Face model of type {model_type!r}; lmforge can read "
            f"model types: {', '.join(map(repr, HF_IMPORTERS))}"
        )
    return HF_IMPORTERS[model_type].load(directory, device=device)


def convert(src: str | Path, dst: str | Path) -> str:
    """Convert SRC to the other format at DST and return a one-line summary.

    SRC an lmforge checkpoint or run folder -> a Hugging Face folder at DST;
    SRC a Hugging Face folder -> an lmforge checkpoint at DST.
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise LmforgeError(
            f"SRC {str(src)!r} does not exist; give an lmforge checkpoint, run folder or HF model folder"
        )
    src_dir = resolve_checkpoint_dir(src)
    _check_dst(src_dir, dst)
    meta = read_meta(src_dir)
    if "format_version" in meta:
        if "quantization" in meta:
            raise LmforgeError(
                f"{str(src_dir)!r} is quantized ({meta['quantization'].get('scheme')}); Hugging Face folders hold "
                f"float weights: convert the float checkpoint it was quantized from"
            )
        ckpt = load_checkpoint(src_dir)
        model_type = meta.get("model_type")
        if model_type not in HF_EXPORTERS:
            raise LmforgeError(
                f"lmforge model_type {model_type!r} has no Hugging Face export; exportable types: "
                f"{', '.join(map(repr, HF_EXPORTERS))}"
            )
        adapter = HF_EXPORTERS[model_type]
        adapter.save(dst, ckpt.model, ckpt.tokenizer)
        return f"converted lmforge checkpoint {src_dir} -> Hugging Face {adapter.MODEL_TYPE} folder {dst} ({_size(ckpt)})"
    if "model_type" in meta:
        ckpt = load_hf_checkpoint(src_dir)
        save_checkpoint(
            dst, ckpt.model, ckpt.tokenizer, extra={"converted_from": ckpt.meta["converted_from"]}
        )
        return f"converted Hugging Face {meta['model_type']} folder {src_dir} -> lmforge checkpoint {dst} ({_size(ckpt)})"
    raise LmforgeError(
        f"{str(src_dir / CONFIG_FILE)!r} has neither format_version (lmforge) nor model_type (Hugging Face); "
        f"cannot tell what to convert"
    )


def _check_dst(src_dir: Path, dst: Path) -> None:
    """Refuse a DST that writing would destroy: SRC itself, or a folder that is not a model."""
    if dst.exists() and dst.resolve() == src_dir.resolve():
        raise LmforgeError(f"DST {str(dst)!r} is SRC; choose a new folder")
    # the output replaces DST whole, so only an empty folder or a previous model may be overwritten
    if dst.is_file() or (dst.is_dir() and any(dst.iterdir()) and not (dst / CONFIG_FILE).is_file()):
        raise LmforgeError(
            f"DST {str(dst)!r} exists and is not a model folder; choose a new or empty folder"
        )


def _size(ckpt: Checkpoint) -> str:
    c = ckpt.model.config
    n = sum(p.numel() for p in ckpt.model.parameters())
    layers = f"{c.n_layer}+{c.n_decoder_layer}" if hasattr(c, "n_decoder_layer") else c.n_layer
    return f"{n / 1e6:.2f}M parameters, {layers} layers, d={c.n_embd}, vocab {c.vocab_size}"


__all__ = ["convert", "load_hf_checkpoint"]

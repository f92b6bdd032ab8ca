"""Checkpoint format: a folder with weights, config and tokenizer side by side.

    CKPT/
      model.safetensors      weights (tied tensors stored once)
      config.json            {"format_version", "model_type", "model": {...}, "train": ..., "data": ...}
      tokenizer.json         + tokenizer_config.json (loadable by HF's PreTrainedTokenizerFast)
      state.pt               training state (optimizer, RNG, data position), only in RUN_DIR/last

A quantized model (`lmforge.compress.quantize`) stores its layers' integer weights and scales as
plain tensors; config.json's "quantization" section lists those layers, which `load_checkpoint`
swaps in before loading.

A training run directory holds `last/` and `best/` checkpoints beside its logs; anything that takes a
checkpoint also takes the run directory (best, else last). Every checkpoint folder is written
whole into a temporary folder and then renamed into place, so a crash mid-write leaves the
previous checkpoint intact. Training state is read with `torch.load(weights_only=True)`:
no pickled code is ever executed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmforge.config import from_dict
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir, recover_dir
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.tokenizer import Tokenizer

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
MODEL_TYPES = {
    "gpt": (GPT, GPTConfig),
    "bert": (Bert, BertConfig),
    "encoder-decoder": (EncoderDecoder, EncoderDecoderConfig),
}


@dataclass
class Checkpoint:
    model: GPT | Bert
    tokenizer: Tokenizer
    meta: dict[str, Any] = field(default_factory=dict)  # the whole config.json
    path: Path | None = None
    # an encoder-decoder trained with separate vocabularies reads its sources with this one (the
    # decoder's is `tokenizer`); None: one joint tokenizer
    source_tokenizer: Tokenizer | None = None

    def generate(self, prompts: str | list[str], **generation_kwargs: Any) -> list:
        """Shortcut for `lmforge.generate.generate` with this checkpoint's model and tokenizer."""
        from lmforge.generate import GenerationConfig, generate

        return generate(self.model, self.tokenizer, prompts, GenerationConfig(**generation_kwargs))


SOURCE_TOKENIZER_DIR = "source_tokenizer"


def model_type_of(model: torch.nn.Module) -> str:
    for name, (cls, _) in MODEL_TYPES.items():
        if isinstance(model, cls):
            return name
    raise TypeError(f"not an lmforge model: {type(model).__name__}")


def weights_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each tensor once (a tied lm_head is the embedding) and contiguous."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    *,
    extra: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    source_tokenizer: Tokenizer | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete checkpoint folder atomically; `extra` adds sections to config.json. An
    encoder-decoder's separate `source_tokenizer` goes into SOURCE_TOKENIZER_DIR/. `weights`
    replaces the model's own tensors (an FSDP model's, gathered whole by
    `train.distributed.gather_state`: in the layout `weights_state_dict` gives)."""
    directory = Path(directory)
    meta = {
        "format_version": FORMAT_VERSION,
        "model_type": model_type_of(model),
        "model": asdict(model.config),
        **(extra or {}),
    }
    # imported here: lmforge.compress imports this module
    from lmforge.compress.quantize import quantization_meta

    meta.pop("quantization", None)  # read off the model, never carried over from `extra`
    if (quantization := quantization_meta(model)) is not None:
        meta["quantization"] = quantization
    with atomic_dir(directory) as tmp:
        tensors = weights_state_dict(model) if weights is None else weights
        if "sparsity" in meta:  # pruned matrices stored as bitmask + values (lmforge.compress.prune)
            from lmforge.compress.prune import encode_sparse

            tensors = encode_sparse(tensors, meta["sparsity"])
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        tokenizer.save(tmp)
        if source_tokenizer is not None:
            source_tokenizer.save(tmp / SOURCE_TOKENIZER_DIR)
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
    return directory


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint folder itself, or a run folder's `best/` (else `last/`)."""
    path = Path(path)
    for candidate in (path, path / "best", path / "last"):
        recover_dir(candidate)
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    if not path.exists():
        raise LmforgeError(f"checkpoint {str(path)!r} does not exist")
    raise LmforgeError(
        f"{str(path)!r} is not a checkpoint: expected {CONFIG_FILE} and {WEIGHTS_FILE} in it, "
        f"or a run folder with best/ or last/"
    )


def read_meta(directory: Path) -> dict[str, Any]:
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{directory / CONFIG_FILE} is not valid JSON: {e}") from e
    return meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load an lmforge checkpoint (or run folder); Hugging Face folders are converted on the fly."""
    directory = resolve_checkpoint_dir(path)
    meta = read_meta(directory)
    if "format_version" not in meta:
        if "model_type" in meta:  # a Hugging Face folder (config.json with model_type "gpt2", ...)
            from lmforge.interop import load_hf_checkpoint

            return load_hf_checkpoint(directory, device=device)
        raise LmforgeError(f"{str(directory)!r} is not an lmforge checkpoint (config.json has no format_version)")
    version = meta["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LmforgeError(
            f"checkpoint {str(directory)!r} has format version {version}, but this lmforge reads versions "
            f"up to {FORMAT_VERSION}; upgrade lmforge to load it"
        )
    model_type = meta.get("model_type")
    if model_type not in MODEL_TYPES:
        raise LmforgeError(
            f"checkpoint {str(directory)!r} has model_type {model_type!r}; this lmforge knows: {', '.join(MODEL_TYPES)}"
        )
    model_cls, config_cls = MODEL_TYPES[model_type]
    config = from_dict(config_cls, meta["model"], section="model")
    model = model_cls(config)
    if "quantization" in meta:  # swap in empty quantized layers; the stored tensors fill them
        from lmforge.compress.quantize import prepare_quantized

        prepare_quantized(model, meta["quantization"], f"checkpoint {str(directory)!r}")
    load_weights(model, directory / WEIGHTS_FILE, sparsity=meta.get("sparsity"))
    model.to(device).eval()
    source = directory / SOURCE_TOKENIZER_DIR
    return Checkpoint(
        model=model, tokenizer=Tokenizer.load(directory), meta=meta, path=directory,
        source_tokenizer=Tokenizer.load(source) if source.is_dir() else None,
    )


def load_weights(model: torch.nn.Module, weights_file: Path, sparsity: dict[str, Any] | None = None) -> None:
    """Copy a weights file into `model`; `sparsity` (config.json's section) names the tensors
    stored compressed by magnitude pruning, decoded back to dense here."""
    if not weights_file.is_file():
        raise LmforgeError(f"missing weights file {str(weights_file)!r}")
    where = f"weights in {str(weights_file)!r}"
    tensors = load_file(str(weights_file))
    if sparsity is not None:
        from lmforge.compress.prune import decode_sparse

        tensors = decode_sparse(tensors, sparsity, where)
    copy_weights(model, tensors, where)


def copy_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Strict load with user-facing errors: every tensor the model stores must be there (a tied
    weight once, under either name), none may be extra, and shapes must match the config.
    Tensors are copied into the model's parameters, casting fp16/bf16 files to their dtype."""
    expected = model.state_dict()
    missing = sorted(set(weights_state_dict(model)) - set(tensors) - _tied_aliases_present(model, tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LmforgeError(
            f"{where} do not fit the model config: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise LmforgeError(
                f"{where}: weight {name} has shape {tuple(tensor.shape)}, the model config expects "
                f"{tuple(expected[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor)


def _tied_aliases_present(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> set[str]:
    """Names whose tensor is shared with another name that `tensors` does hold."""
    by_storage: dict[tuple, list[str]] = {}
    for name, t in model.state_dict().items():
        by_storage.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(name)
    return {n for names in by_storage.values() if any(m in tensors for m in names) for n in names}


def load_train_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise LmforgeError(f"no training state in {str(directory)!r} ({STATE_FILE} missing); cannot resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LmforgeError(f"training state {str(path)!r} could not be read safely: {e}".replace("\n", " ")) from e

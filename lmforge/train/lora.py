"""LoRA: parameter-efficient fine-tuning with low-rank adapters (Hu et al. 2021).

    apply_lora(model, config)   wrap the targeted Linear layers in `LoraLinear`, freeze the rest
    (train: only the adapters, the saved modules and the chosen biases get gradients)
    merge_lora(model)           fold each adapter into its weight: plain nn.Linear layers again
    merged_state_dict(model)    the same weights as tensors, `model` left adapted (checkpoints mid-run)
    save_adapter / load_adapter the adapter alone: a folder of a few hundred KB instead of a model
    resume_lora(model, meta, ...) a resumed run: the base back under the saved adapters

A targeted layer computes y = base(x) + (dropout(x) @ A^T @ B^T) * alpha / rank, with the base
frozen, A (rank, in) Kaiming-uniform and B (out, rank) zero: at the start the model is exactly the
base, and only rank * (in + out) numbers per layer are trained. `merge_lora` adds B @ A * scale to
the base weight, so the merged model costs nothing extra at inference.

Targets are names matched against module names: "c_attn" hits every module called `c_attn`
(`h.0.attn.c_attn`, an encoder-decoder's cross-attention's too), "mlp.c_proj" only the MLP's, a
full path one layer. The shared blocks (`lmforge.nn`) name their layers `c_attn`/`c_proj`
(attention) and `c_fc`/`c_proj` (MLP), so one config fits GPT, BERT and the encoder-decoder;
`BLOCK_LINEARS` names them all (the generative families' default: QLoRA's "every Linear layer").
A fresh task head cannot be low-rank: `modules_to_save` names modules trained in full and stored
in the adapter (PEFT's option of that name).

Any module with `in_features`/`out_features`, a `weight` and a `bias` can be the base, so a layer
quantized by `lmforge.compress.quantize` (int8/int4 integers, frozen by construction) takes an
adapter too, trained in float: QLoRA's recipe (Dettmers et al. 2023) with lmforge's quantizers.
torch's integer kernels have no backward, so the adapter supplies the input gradient (dy @ W,
W dequantized) and every quantized layer must be a target (QLoRA adapts all Linear layers anyway).
Merging such a layer gives a float Linear (dequantized weight + update); quantize again if wanted.

An adapter folder holds `adapter.safetensors` (the trained tensors, under the adapted model's
names) and `adapter_config.json` (this config, the base checkpoint's path, the adapted model's
config and a hash of it), so a base and an adapter can be checked against each other.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.checkpoint import (
    MODEL_TYPES,
    Checkpoint,
    load_checkpoint,
    model_type_of,
    weights_state_dict,
)
from lmforge.config import check, check_choice, from_dict
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT_VERSION = 1
TRAIN_BIAS = ("none", "all", "lora_only")  # PEFT's `bias` choices
# every Linear layer of the shared blocks (attention, cross-attention, MLP); never a tied lm_head
BLOCK_LINEARS = ("c_attn", "c_proj", "c_fc")
ADAPTER_DIR = "adapter"  # RUN_DIR/adapter: the best checkpoint's adapter alone


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the input of the adapter path only
    # names or dotted suffixes of the Linear modules to adapt
    target_modules: tuple[str, ...] = ("c_attn",)
    # none: biases stay frozen; all: every bias trains; lora_only: the adapted layers' biases train
    train_bias: str = "none"
    # modules trained in full and stored in the adapter (a fresh classification head)
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check(
            isinstance(self.rank, int) and self.rank >= 1,
            f"LoRA rank must be an integer >= 1, got {self.rank!r}",
        )
        check(self.alpha > 0, f"LoRA alpha must be > 0, got {self.alpha}")
        check(0.0 <= self.dropout < 1.0, f"LoRA dropout must be in [0, 1), got {self.dropout}")
        check_choice("train_bias", self.train_bias, TRAIN_BIAS)
        # a file or the command line gives lists or "a,b"; keep tuples, so the config is hashable
        for name in ("target_modules", "modules_to_save"):
            value = getattr(self, name)
            value = tuple(v.strip() for v in value.split(",")) if isinstance(value, str) else tuple(value)
            check(all(isinstance(v, str) and v for v in value), f"{name} must be module names, got {value!r}")
            setattr(self, name, value)
        check(bool(self.target_modules), "target_modules must name at least one Linear module (e.g. c_attn)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraLinear(nn.Module):
    """A frozen layer plus a trainable low-rank update: base(x) + dropout(x) @ A^T @ B^T * scale."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scale = rank, alpha / rank
        # float Linear: the adapters take its dtype; a quantized layer's adapters train in fp32
        tensor = next(iter(base.parameters()), None)
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else torch.float32
        device = tensor.device if tensor is not None else next(base.buffers()).device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        # A as nn.Linear initialises its weight (and as the paper's reference code does); B = 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., out)
        if isinstance(self.base, nn.Linear) or not x.requires_grad:
            return self.base(x) + update * self.scale
        return _FrozenQuantizedCall.apply(x, self.base) + update * self.scale

    def delta(self) -> torch.Tensor:
        """The (out, in) update B @ A * scale that merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scale

    @property
    def weight(self) -> torch.Tensor:
        """The effective matrix, differentiable in A and B: for code that applies slices of a
        Linear's weight itself (cross-attention's queries and keys/values). That path has no
        adapter dropout."""
        base = self.base.weight
        return base + self.delta().to(base.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing what this module computes (in eval mode)."""
        with torch.no_grad():
            weight = self.base.weight.float() + self.delta().float()
            base_bias = self.base.bias
            # skip_init: no random initialisation, so saving a merged copy mid-run draws nothing
            # from the RNG that training (dropout) goes on with
            linear = nn.utils.skip_init(nn.Linear, self.in_features, self.out_features,
                                        bias=base_bias is not None, device=weight.device,
                                        dtype=self.lora_A.dtype)
            linear.weight.copy_(weight)
            if base_bias is not None:
                linear.bias.copy_(base_bias)
        return linear

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


class _FrozenQuantizedCall(torch.autograd.Function):
    """A quantized layer's call with a backward for its input: torch's integer kernels have none.
    The gradient is dy @ W with W dequantized (QLoRA's backward); the integers get none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        ctx.module = module
        return module(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.module.weight.to(grad.dtype), None  # (..., out) @ (out, in)


# ---- applying, merging -----------------------------------------------------------------------
def _is_linear(module: nn.Module) -> bool:
    """A layer an adapter can wrap: nn.Linear, or a quantized one (anything shaped like it)."""
    if isinstance(module, LoraLinear):
        return False
    if isinstance(module, nn.Linear):
        return True
    from lmforge.compress.quantize import QuantizedLinear  # here: lmforge.compress imports train

    return isinstance(module, QuantizedLinear)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _in_saved(name: str, saved: tuple[str, ...]) -> bool:
    """Whether tensor `name` lies inside one of the modules `saved` names."""
    parts = name.split(".")
    return any(_matches(".".join(parts[:i]), saved) for i in range(1, len(parts)))


def linear_names(model: nn.Module) -> list[str]:
    """The Linear layers' names as targets (`attn.c_attn`, `lm_head`): for error messages."""
    return linear_names_of([n for n, m in model.named_modules() if _is_linear(m)])


def linear_names_of(names: list[str]) -> list[str]:
    # `transformer.h.3.attn.c_attn` -> `attn.c_attn`: a suffix every block's layer matches
    return sorted({re.sub(r"^(.*\.)?h\.\d+\.", "", n) for n in names})


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap `config.target_modules` in `LoraLinear` (in place) and freeze every parameter but
    the adapters, `modules_to_save` and the biases `train_bias` names; returns `model`."""
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise LmforgeError("the model already has LoRA adapters; merge_lora(model) before adding new ones")
    linears = {n: m for n, m in model.named_modules() if _is_linear(m)}
    unknown = [t for t in config.target_modules if not any(_matches(n, (t,)) for n in linears)]
    if unknown:
        raise LmforgeError(
            f"LoRA target module(s) {', '.join(map(repr, unknown))} match no Linear layer of this "
            f"{type(model).__name__}; its Linear layers are: {', '.join(linear_names(model))} "
            f"(a name matches every module ending in it; a path with h.N. picks one layer)"
        )
    all_modules = dict(model.named_modules())
    missing = [s for s in config.modules_to_save if not any(_matches(n, (s,)) for n in all_modules if n)]
    if missing:
        raise LmforgeError(
            f"modules_to_save {', '.join(map(repr, missing))} match no module of this {type(model).__name__}"
        )
    quantized = [n for n, m in linears.items()
                 if not isinstance(m, nn.Linear) and not _matches(n, config.target_modules)]
    if quantized:
        raise LmforgeError(
            f"LoRA over a quantized model needs an adapter on every quantized layer (torch's integer "
            f"kernels pass no gradient; the adapter's backward does): add "
            f"{', '.join(linear_names_of(quantized))} to target_modules, as QLoRA adapts all Linear layers"
        )
    targets = {n: m for n, m in linears.items() if _matches(n, config.target_modules)}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    tied = [n for n, m in targets.items() if isinstance(m, nn.Linear) and id(m.weight) in embeddings]
    if tied:
        raise LmforgeError(
            f"cannot put a LoRA adapter on {', '.join(map(repr, tied))}: its weight is tied to the "
            f"embedding table, which merging would change too; leave it out of target_modules"
        )
    # every check is done: the model changes only now
    for name, module in targets.items():
        parent, _, child = name.rpartition(".")
        adapted = LoraLinear(module, config.rank, config.alpha, config.dropout)
        setattr(model.get_submodule(parent), child, adapted)
    trained = set(_adapter_names(model, config))
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)
    model.lora_config = config  # read by lora_state_dict, save_adapter
    return model


def _adapter_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """The parameters LoRA trains, under the adapted model's names."""
    lora_layers = {n for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    names = []
    for name, _ in model.named_parameters():
        owner = name.rpartition(".")[0]
        if (
            name.endswith((".lora_A", ".lora_B"))
            or _in_saved(name, config.modules_to_save)
            or (config.train_bias == "all" and name.endswith("bias"))
            or (config.train_bias == "lora_only" and name.endswith(".base.bias")
                and owner.rpartition(".")[0] in lora_layers)
        ):
            names.append(name)
    return names


def lora_config_of(model: nn.Module) -> LoraConfig:
    config = getattr(model, "lora_config", None)
    if config is None or not any(isinstance(m, LoraLinear) for m in model.modules()):
        raise LmforgeError("the model has no LoRA adapters (apply_lora or load_adapter first)")
    return config


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors only: adapters, saved modules, trained biases (detached, contiguous)."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().contiguous() for n in _adapter_names(model, lora_config_of(model))}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer (in place): plain nn.Linear layers, every parameter
    trainable again, an ordinary model any lmforge code takes; returns `model`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    model.__dict__.pop("lora_config", None)
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A merged copy, leaving `model` (and its frozen base weights) as it is."""
    return merge_lora(copy.deepcopy(model))


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors `merge_lora(model)` would leave (as `checkpoint.weights_state_dict` lists them:
    a tied tensor once), without changing `model` or copying its unadapted weights. Each merged
    layer is made on the model's device and moved to the CPU at once, so a checkpoint mid-run
    costs the memory of one layer, not of a second model. Over a quantized base use `merged_copy`:
    `save_checkpoint` reads the quantization section off the model it is given, and the adapted
    model still holds the quantized layers the merged one replaces."""
    lora_layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    out = {}
    for name, tensor in weights_state_dict(model).items():
        parts = name.split(".")
        if not any(".".join(parts[:i]) in lora_layers for i in range(1, len(parts))):
            out[name] = tensor  # not inside an adapted layer: as it is
    for prefix, module in lora_layers.items():
        for name, tensor in module.merged().state_dict().items():
            out[f"{prefix}.{name}"] = tensor.cpu()
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters, a tied tensor counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def frozen_matmul_weights(model: nn.Module) -> int:
    """Weights of the frozen Linear layers (a LoRA base's, tied ones once): their backward
    computes the input gradient but no weight gradient, 4 FLOPs per weight and token instead of
    the 6 of `flops_per_token`'s 6N."""
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, nn.Linear) and not m.weight.requires_grad)


# ---- adapter folders -------------------------------------------------------------------------
def config_hash(model: nn.Module) -> str:
    """A short hash of the model config: tells whether an adapter was made for this model."""
    text = json.dumps(asdict(model.config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_adapter(model: nn.Module, directory: str | Path, base: str | Path | None = None) -> Path:
    """Write `adapter.safetensors` + `adapter_config.json` atomically; `base` is the checkpoint the
    frozen weights come from, recorded for `lmforge lora merge` and for error messages."""
    config = lora_config_of(model)
    meta = {
        "format_version": ADAPTER_FORMAT_VERSION,
        "lora": asdict(config),
        "base": None if base is None else str(base),
        "model_type": model_type_of(model),
        "model": asdict(model.config),
        "model_config_hash": config_hash(model),
    }
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        save_file(lora_state_dict(model), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file() or not (directory / ADAPTER_WEIGHTS).is_file():
        raise LmforgeError(
            f"{str(directory)!r} is not a LoRA adapter folder: expected {ADAPTER_CONFIG} and "
            f"{ADAPTER_WEIGHTS} in it (a fine-tuning run with --lora writes RUN_DIR/adapter)"
        )
    try:
        meta = json.loads((directory / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{directory / ADAPTER_CONFIG} is not valid JSON: {e}") from e
    version = meta.get("format_version")
    if not isinstance(version, int) or version > ADAPTER_FORMAT_VERSION:
        raise LmforgeError(f"adapter {str(directory)!r} has format version {version!r}; this lmforge "
                           f"reads versions up to {ADAPTER_FORMAT_VERSION}")
    return meta


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the adapter in `directory` to `model` (in place) and load its tensors strictly
    (`load_lora_state_dict`); returns `model`."""
    meta = read_adapter_config(directory)
    config = from_dict(LoraConfig, meta["lora"], "lora")
    where = (f"adapter {str(directory)!r} (made for base {meta.get('base')!r}, model config hash "
             f"{meta.get('model_config_hash')}; this model's is {config_hash(model)})")
    try:
        apply_lora(model, config)
    except LmforgeError as e:
        raise LmforgeError(f"{where} does not fit this model: {e}") from e
    load_lora_state_dict(model, load_file(str(Path(directory) / ADAPTER_WEIGHTS)), where)
    return model


def load_lora_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy `lora_state_dict`-style tensors into an adapted model, strictly: every tensor the
    model's LoRA config implies must be there with the model's shape, none may be extra."""
    params = dict(model.named_parameters())
    expected = set(_adapter_names(model, lora_config_of(model)))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise LmforgeError(f"{where} does not fit this model: missing {missing[:3]}"
                           f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                           f"{'...' if len(unexpected) > 3 else ''}")
    for name, tensor in tensors.items():
        if tensor.shape != params[name].shape:
            raise LmforgeError(f"{where} does not fit this model: {name} has shape {tuple(tensor.shape)}, "
                               f"the model's is {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def resume_lora(model: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                given: LoraConfig | None = None, base_model: nn.Module | None = None, where: str = "") -> LoraConfig:
    """A LoRA run resumed from its `last` checkpoint: `model` holds the saved (merged) weights,
    `meta` its config.json (the run's "lora" config and "base" path), `tensors` the adapters from
    its state.pt. The frozen base (`base_model`, else the checkpoint `meta["base"]` names) goes
    back under the adapters, in place, and merging must give the saved weights again: else the
    base is not the one the run started from (moved, retrained), which is an error. Returns the
    run's LoRA config; `given`, when not None, must equal it."""
    config = from_dict(LoraConfig, meta["lora"], "lora")
    if given is not None and given != config:
        raise LmforgeError(f"{where}: the run trains LoRA {asdict(config)}; a resumed run keeps it (drop the "
                           f"LoRA options)")
    if base_model is None:
        if meta.get("base") is None:
            raise LmforgeError(f"{where}: the run records no base checkpoint to put under its adapters; "
                               f"pass the base model")
        base_model = load_checkpoint(meta["base"], device=next(model.parameters()).device).model
    saved = {n: t.clone() for n, t in weights_state_dict(model).items()}
    try:
        model.load_state_dict(base_model.state_dict())
    except RuntimeError as e:  # another architecture or size
        raise LmforgeError(f"{where}: the base {meta.get('base')!r} does not fit the run's model: "
                           f"{' '.join(str(e).split())[:300]}") from e
    apply_lora(model, config)
    load_lora_state_dict(model, tensors, where)
    merged = merged_state_dict(model)
    # the same arithmetic on the same weights; a resume on another device may round differently
    off = [n for n, t in saved.items()
           if n not in merged or not torch.allclose(merged[n].to(t.device, t.dtype), t, rtol=1e-4, atol=1e-5)]
    if off:
        raise LmforgeError(
            f"{where}: the base {meta.get('base')!r} with the saved adapters does not give the saved "
            f"model ({len(off)} tensors differ, e.g. {off[0]}); is it the base this run started from?"
        )
    return config


def load_adapted_checkpoint(base: str | Path | None, directory: str | Path) -> Checkpoint:
    """The base checkpoint with the adapter applied. `base` None: the one the adapter records.

    The adapted model may differ from the base in its head (fine-tuning adds a classifier to a
    pretrained encoder): it is then built from the adapter's model config, every weight that is
    not a saved module copied from the base, and a weight neither provides is an error."""
    meta = read_adapter_config(directory)
    base = base if base is not None else meta.get("base")
    if base is None:
        raise LmforgeError(f"adapter {str(directory)!r} records no base checkpoint; name the base")
    ckpt = load_checkpoint(base)
    if model_type_of(ckpt.model) != meta["model_type"]:
        raise LmforgeError(f"adapter {str(directory)!r} is for a {meta['model_type']} model; "
                           f"{str(base)!r} is a {model_type_of(ckpt.model)}")
    if asdict(ckpt.model.config) != meta["model"]:
        ckpt.model = _rebuild(ckpt.model, meta, f"adapter {str(directory)!r} over base {str(base)!r}")
    load_adapter(ckpt.model, directory)
    return ckpt


def _rebuild(base_model: nn.Module, meta: dict[str, Any], where: str) -> nn.Module:
    from lmforge.compress.quantize import refuse_quantized

    refuse_quantized(base_model, "rebuild with another head")
    model_cls, config_cls = MODEL_TYPES[meta["model_type"]]
    model = model_cls(from_dict(config_cls, meta["model"], "model")).eval()
    saved = tuple(meta["lora"].get("modules_to_save") or ())
    base_tensors = base_model.state_dict()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if _in_saved(name, saved):
                continue  # the adapter holds it
            if name not in base_tensors or base_tensors[name].shape != tensor.shape:
                found = "missing" if name not in base_tensors else f"shaped {tuple(base_tensors[name].shape)}"
                raise LmforgeError(f"{where}: the adapted model needs {name} {tuple(tensor.shape)}, "
                                   f"the base's is {found}; is this the base the adapter was trained on?")
            tensor.copy_(base_tensors[name])
    return model

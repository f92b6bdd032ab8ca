"""Post-training quantization of a model's Linear layers: int8 or int4 weights, for smaller
checkpoints and less memory per decoded token.

Schemes (`SCHEMES`), each a small module that replaces an `nn.Linear`:
- "int8-weight" (`Int8WeightLinear`): weight-only int8, one symmetric scale per output channel,
  w ~ q * scale with q in [-127, 127]. Activations stay floating point.
- "int8-dynamic" (`Int8DynamicLinear`): int8 weights as above and int8 activations, quantized
  per token (one symmetric scale per row of x) at every call; the matmul is int8 x int8 with
  int32 accumulation, then rescaled (torchao's Int8DynamicActivationInt8Weight; LLM.int8()'s
  vector-wise quantization without the outlier split, Dettmers et al. 2022).
- "int4-weight" (`Int4WeightLinear`): weight-only int4 in groups of `group_size` input channels,
  asymmetric: w ~ (q - 8) * scale + zero with q in [0, 15] and one (scale, zero) per group
  (the layout of the "tinygemm" kernels that GPTQ/AWQ-style int4 models use).

Kernels. On CPU each module calls an aten kernel that ships with torch itself:
`torch._weight_int8pack_mm`, `torch._int_mm` and `torch._weight_int4pack_mm_for_cpu`. The two
weight-only kernels are vectorised for bf16 activations only: measured on a Zen4 CPU with torch
2.13, a 384 -> 1536 layer at batch 1 takes ~40 us with bf16 input against ~500-800 us with fp32
input (a scalar loop), and fp32 `F.linear` ~60-100 us. So the weight-only schemes round the
activations to bf16 for the matmul and return the input's dtype; that rounding (~0.4% of a value)
is at most the size of int8's own error and far below int4's. Off CPU (or where a kernel is
missing) `reference_forward` runs instead: dequantize, then a float matmul, exactly the math the
CPU kernels are tested against. torchao 0.18 was measured and not used (see the README).

Storage. A quantized module's state is plain tensors: `qweight` (int8 (N, K), or for int4 two
4-bit values per uint8 (N, K/2), low nibble first), `scales` (and int4's `zeros`), and `bias`.
So a quantized checkpoint is an ordinary safetensors file; config.json's "quantization" section
names the scheme, the group size and the quantized modules, and `load_checkpoint` builds the float
model from the config, swaps those modules for empty quantized ones (`prepare_quantized`) and
loads the tensors strictly. The CPU int4 kernel wants its weights in a layout that depends on the
CPU's vector width (AVX512, AVX2, none); that layout is built from `qweight` at first use and
kept beside it, so in memory an int4 layer holds its weights twice (1 byte per weight in all).

What is quantized: every Linear in the Transformer blocks (attention `c_attn`/`c_proj`, MLP
`c_fc`/`c_proj`); with `include_head` also those outside them (GPT's and the encoder-decoder's
`lm_head`, BERT's pooler, MLM dense layer, NSP and classifier). Embeddings stay float, and so
does a head tied to them. A layer stays float, with the reason in the summary, when it is tied,
when it is cross-attention's `c_attn` (its query and key/value rows are sliced and applied
apart, the keys/values once per source), or when the int4 kernel cannot take its shape
(in_features not a multiple of the group, out_features not a multiple of 16).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.checkpoint import (
    WEIGHTS_FILE,
    load_checkpoint,
    read_meta,
    resolve_checkpoint_dir,
    save_checkpoint,
    weights_state_dict,
)
from lmforge.errors import LmforgeError
from lmforge.nn import Block, CrossAttention

SCHEMES = ("int8-weight", "int8-dynamic", "int4-weight")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 CPU kernel takes
DEFAULT_GROUP_SIZE = 128
INT4_OUT_MULTIPLE = 16  # the int4 CPU kernel packs output channels in blocks of 16


# ---- quantizing tensors --------------------------------------------------------------------
def _bf16_at_least(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded to bf16, nudged up first so that the stored scale is never smaller than
    wanted (a smaller one would clip the largest weights)."""
    return (x * (1 + 2**-8)).to(torch.bfloat16)


def quantize_int8_per_channel(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> q int8 (N, K) and scales (N,) with weight ~ q * scales[:, None].

    Symmetric, absmax / 127 per output channel; q is computed from the stored (possibly bf16)
    scale, so |weight - q * scale| <= scale / 2 everywhere."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    scale = _bf16_at_least(scale) if scale_dtype == torch.bfloat16 else scale.to(scale_dtype)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4_groupwise(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> packed nibbles uint8 (N, K/2), scales and zeros bf16 (N, K/group) with
    weight ~ (q - 8) * scale + zero per group, q in [0, 15].

    Asymmetric min/max per group. The scale is floored at amax / 240 so that rounding the zero
    point to bf16 costs less than half a step (it matters only for nearly constant groups); with
    that, |weight - dequantized| <= scale / 2 everywhere."""
    N, K = weight.shape
    w = weight.detach().float().view(N, K // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    amax = torch.maximum(lo.abs(), hi.abs())
    scale = _bf16_at_least(torch.maximum((hi - lo) / 15, amax / 240).clamp(min=1e-12))
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    q = torch.round((w - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
    q = q.to(torch.uint8).view(N, K)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale, zero


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2), low nibble first -> int32 (N, K) values in [0, 15]."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).view(packed.shape[0], -1).to(torch.int32)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> int8 (M, K) and fp32 scales (M, 1): symmetric per token (row)."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


# ---- the modules ---------------------------------------------------------------------------
class QuantizedLinear(nn.Module, ABC):
    """What the three schemes share: the shape, an optional float bias, the call on (..., K)
    inputs, and `weight` for code that reads a Linear's matrix directly."""

    scheme: ClassVar[str]
    kernel: ClassVar[str]  # the torch op the CPU path calls

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        # follows `model.to(dtype)` (not saved): the dtype `weight` is given in
        self.register_buffer("_float", torch.zeros(0), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None) -> QuantizedLinear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        module._set_weight(linear.weight)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        module._float = torch.zeros(0, dtype=linear.weight.dtype)
        return module.to(linear.weight.device)

    @abstractmethod
    def _set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float (N, K) weight into this scheme's buffers."""

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The float32 (N, K) matrix the quantized weights stand for."""

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized matrix, computed at every access: for code that reads `.weight` of a
        Linear (its dtype and device, or slices of it). The module's own call never uses it."""
        return self.dequantize().to(self._float.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x.device.type == "cpu" and hasattr(torch, self.kernel):
            y = self._cpu_matmul(x2.contiguous())
        else:
            y = self._reference_matmul(x2)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize-then-matmul: the path off CPU, and what the CPU kernels must reproduce."""
        y = self._reference_matmul(x.reshape(-1, self.in_features)).to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    @abstractmethod
    def _cpu_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) @ the weight^T through this scheme's torch CPU kernel."""

    def _reference_matmul(self, x: torch.Tensor) -> torch.Tensor:
        # the weight-only kernels take bf16 activations and round their fp32 sums to bf16
        return F.linear(x.to(torch.bfloat16).float(), self.dequantize()).to(torch.bfloat16)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}{group}")


class Int8WeightLinear(QuantizedLinear):
    scheme, kernel = "int8-weight", "_weight_int8pack_mm"

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int | None = None):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features, dtype=torch.bfloat16))

    def _set_weight(self, weight: torch.Tensor) -> None:
        self.qweight, self.scales = quantize_int8_per_channel(weight, torch.bfloat16)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    def _cpu_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scales.to(torch.bfloat16))


class Int8DynamicLinear(QuantizedLinear):
    scheme, kernel = "int8-dynamic", "_int_mm"

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int | None = None):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features))

    def _set_weight(self, weight: torch.Tensor) -> None:
        self.qweight, self.scales = quantize_int8_per_channel(weight, torch.float32)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    def _cpu_matmul(self, x: torch.Tensor) -> torch.Tensor:
        xq, x_scale = quantize_activations(x)
        acc = torch._int_mm(xq, self.qweight.T)  # (M, N) int32
        return acc.float() * x_scale * self.scales.float()

    def _reference_matmul(self, x: torch.Tensor) -> torch.Tensor:
        # integer products summed in fp32: exact while K * 127^2 < 2^24 (K < 1040)
        xq, x_scale = quantize_activations(x)
        return (xq.float() @ self.qweight.float().T) * x_scale * self.scales.float()


class Int4WeightLinear(QuantizedLinear):
    scheme, kernel = "int4-weight", "_weight_int4pack_mm_for_cpu"

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int | None = DEFAULT_GROUP_SIZE):
        group_size = group_size or DEFAULT_GROUP_SIZE
        super().__init__(in_features, out_features, bias, group_size)
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.bfloat16))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.bfloat16))
        self._packed: tuple[Any, torch.Tensor, torch.Tensor] | None = None  # (key, weight, scales_and_zeros)

    def _set_weight(self, weight: torch.Tensor) -> None:
        self.qweight, self.scales, self.zeros = quantize_int4_groupwise(weight, self.group_size)

    def dequantize(self) -> torch.Tensor:
        N, K, g = self.out_features, self.in_features, self.group_size
        q = unpack_int4(self.qweight).float().view(N, K // g, g)
        return ((q - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]).view(N, K)

    def _cpu_matmul(self, x: torch.Tensor) -> torch.Tensor:
        weight, scales_and_zeros = self._cpu_layout()
        return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), weight, self.group_size, scales_and_zeros)

    def _cpu_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's weight layout and its (K/group, N, 2) scales-and-zeros, built once and
        rebuilt when the stored tensors change in place (a checkpoint loaded into the module)."""
        key = (self.qweight.device, self.qweight._version, self.scales._version, self.zeros._version)
        if self._packed is None or self._packed[0] != key:
            weight = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(self.qweight), 1)
            scales_and_zeros = torch.stack([self.scales.T, self.zeros.T], dim=-1).to(torch.bfloat16).contiguous()
            self._packed = (key, weight, scales_and_zeros)
        return self._packed[1], self._packed[2]


QUANTIZED_LINEAR: dict[str, type[QuantizedLinear]] = {
    cls.scheme: cls for cls in (Int8WeightLinear, Int8DynamicLinear, Int4WeightLinear)
}


# ---- which layers ----------------------------------------------------------------------------
def check_scheme(scheme: str, group_size: int | None) -> int | None:
    """The group size to use (None for the int8 schemes), or a LmforgeError naming what is valid."""
    if scheme not in SCHEMES:
        raise LmforgeError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme != "int4-weight":
        if group_size is not None:
            raise LmforgeError(f"--group-size applies to int4-weight only; {scheme} has one scale per output channel")
        return None
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if group_size not in INT4_GROUP_SIZES:
        raise LmforgeError(
            f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))} (what the int4 kernel "
            f"takes), got {group_size}"
        )
    return group_size


def plan(
    model: nn.Module, scheme: str, group_size: int | None, include_head: bool = False
) -> tuple[list[str], dict[str, str]]:
    """The Linear layers `quantize` would replace, and those it keeps float with the reason."""
    blocks = [name + "." for name, m in model.named_modules() if isinstance(m, Block)]
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    targets, kept = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        in_block = any(name.startswith(prefix) for prefix in blocks)
        parent = model.get_submodule(name.rpartition(".")[0])
        if id(module.weight) in tables:
            kept[name] = "tied to the token embedding, which stays float"
        elif not in_block and not include_head:
            kept[name] = "outside the Transformer blocks (include_head / --include-head quantizes it)"
        elif isinstance(parent, CrossAttention) and name.endswith(".c_attn"):
            kept[name] = "cross-attention applies its query and key/value rows apart (keys/values once per source)"
        elif scheme == "int4-weight" and module.in_features % group_size:
            kept[name] = f"in_features={module.in_features} is not a multiple of the int4 group size {group_size}"
        elif scheme == "int4-weight" and module.out_features % INT4_OUT_MULTIPLE:
            kept[name] = f"out_features={module.out_features} is not a multiple of {INT4_OUT_MULTIPLE} (int4 kernel)"
        else:
            targets.append(name)
    return targets, kept


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def quantization_meta(model: nn.Module) -> dict[str, Any] | None:
    """config.json's "quantization" section for `model`, or None when nothing is quantized."""
    modules = quantized_modules(model)
    if not modules:
        return None
    first = next(iter(modules.values()))
    return {"scheme": first.scheme, "group_size": first.group_size, "modules": list(modules)}


def refuse_quantized(model: nn.Module, action: str) -> None:
    """A LmforgeError if `model` has quantized layers, which `action` ("train", ...) cannot update."""
    meta = quantization_meta(model)
    if meta is not None:
        raise LmforgeError(
            f"cannot {action} a quantized model ({meta['scheme']}, {len(meta['modules'])} layers): its weights are "
            f"frozen integers; {action} the float checkpoint, then quantize the result"
        )


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


# ---- the model and checkpoint API ------------------------------------------------------------
@dataclass
class QuantizeSummary:
    scheme: str
    group_size: int | None
    quantized: list[str]
    kept_float: dict[str, str]  # layer -> why it stays float
    weight_bytes: tuple[int, int]  # every stored tensor, before -> after
    layer_bytes: tuple[int, int]  # the quantized layers' tensors (weights, scales, biases), before -> after
    file_bytes: tuple[int, int] | None = None  # model.safetensors, when a checkpoint was quantized
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        group = f" (groups of {self.group_size})" if self.group_size else ""
        lines = [f"quantized {len(self.quantized)} Linear layers to {self.scheme}{group}"]
        for name, why in self.kept_float.items():
            lines.append(f"  kept float: {name}: {why}")
        lines.append(f"quantized layers: {_mb(self.layer_bytes[0])} -> {_mb(self.layer_bytes[1])} "
                     f"({self.layer_bytes[1] / self.layer_bytes[0]:.2f}x)")
        lines.append(f"all weights: {_mb(self.weight_bytes[0])} -> {_mb(self.weight_bytes[1])}")
        if self.file_bytes is not None:
            lines.append(f"{WEIGHTS_FILE}: {_mb(self.file_bytes[0])} -> {_mb(self.file_bytes[1])} "
                         f"({self.file_bytes[1] / self.file_bytes[0]:.2f}x)")
        return "\n".join(lines + self.notes)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _bytes(tensors: dict[str, torch.Tensor], prefixes: list[str] | None = None) -> int:
    return sum(
        t.numel() * t.element_size() for name, t in tensors.items()
        if prefixes is None or name.rpartition(".")[0] in prefixes
    )


@torch.no_grad()
def quantize(
    model: nn.Module, scheme: str, group_size: int | None = None, *, include_head: bool = False
) -> QuantizeSummary:
    """Replace `model`'s Linear layers with quantized ones, in place, and say what was done.

    `scheme` is one of SCHEMES; `group_size` (int4-weight only; default 128) is the number of
    input channels sharing one scale and zero point. `include_head` also quantizes the Linear
    layers outside the Transformer blocks (an untied `lm_head`, BERT's heads)."""
    done = quantization_meta(model)
    if done is not None:
        raise LmforgeError(
            f"the model is already quantized ({done['scheme']}, {len(done['modules'])} layers); quantize its "
            f"float checkpoint instead"
        )
    group_size = check_scheme(scheme, group_size)
    targets, kept = plan(model, scheme, group_size, include_head)
    if not targets:
        sizes = sorted({m.in_features for m in model.modules() if isinstance(m, nn.Linear)})
        raise LmforgeError(
            f"no Linear layer can be quantized to {scheme}"
            + (f" with group size {group_size}: in_features are {sizes}; choose a group size among "
               f"{', '.join(map(str, INT4_GROUP_SIZES))} that divides them" if group_size else "")
        )
    before = weights_state_dict(model)
    cls = QUANTIZED_LINEAR[scheme]
    for name in targets:
        _swap(model, name, cls.from_linear(model.get_submodule(name), group_size))
    after = weights_state_dict(model)
    return QuantizeSummary(
        scheme=scheme, group_size=group_size, quantized=targets, kept_float=kept,
        weight_bytes=(_bytes(before), _bytes(after)),
        layer_bytes=(_bytes(before, targets), _bytes(after, targets)),
    )


def prepare_quantized(model: nn.Module, section: Any, where: str) -> None:
    """Swap the Linear layers that config.json's "quantization" `section` lists for empty
    quantized modules, ready for the strict load of the stored tensors (`load_checkpoint`)."""
    if not isinstance(section, dict) or not isinstance(section.get("modules"), list):
        raise LmforgeError(f"{where}: the \"quantization\" section must hold scheme, group_size and a modules list")
    scheme, group_size = section.get("scheme"), section.get("group_size")
    if scheme not in SCHEMES:
        raise LmforgeError(
            f"{where} is quantized with scheme {scheme!r}; this lmforge knows {', '.join(SCHEMES)}"
        )
    if scheme == "int4-weight" and group_size not in INT4_GROUP_SIZES:
        raise LmforgeError(f"{where}: int4 group size {group_size!r} is not one of {INT4_GROUP_SIZES}")
    cls = QUANTIZED_LINEAR[scheme]
    for name in section["modules"]:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise LmforgeError(f"{where}: quantized module {name!r} is not a Linear layer of the model config")
        _swap(model, name, cls(linear.in_features, linear.out_features, linear.bias is not None, group_size))


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    scheme: str,
    group_size: int | None = None,
    *,
    include_head: bool = False,
) -> QuantizeSummary:
    """`lmforge quantize`: load SRC (an lmforge checkpoint, run folder or Hugging Face folder),
    quantize it and save it to DST with the same tokenizer(s) and config sections."""
    from lmforge.interop import _check_dst

    src_dir = resolve_checkpoint_dir(src)
    meta = read_meta(src_dir)
    if "quantization" in meta:
        q = meta["quantization"]
        raise LmforgeError(
            f"{str(src_dir)!r} is already quantized ({q.get('scheme') if isinstance(q, dict) else q}); quantize "
            f"its float checkpoint instead"
        )
    _check_dst(src_dir, Path(dst))
    ckpt = load_checkpoint(src_dir)
    summary = quantize(ckpt.model, scheme, group_size, include_head=include_head)
    # training state does not carry over; magnitude pruning's sparse encoding is for float tensors
    extra = {k: v for k, v in ckpt.meta.items() if k not in ("format_version", "model_type", "model", "sparsity")}
    if "sparsity" in ckpt.meta:
        summary.notes.append("note: the source was magnitude-pruned; its zeros are stored densely as integers now")
    save_checkpoint(dst, ckpt.model, ckpt.tokenizer, extra=extra, source_tokenizer=ckpt.source_tokenizer)
    src_file = src_dir / WEIGHTS_FILE
    src_bytes = src_file.stat().st_size if src_file.is_file() else summary.weight_bytes[0]  # HF: other file names
    summary.file_bytes = (src_bytes, (Path(dst) / WEIGHTS_FILE).stat().st_size)
    return summary

"""Pruning: remove the weights a model does best without, to make it smaller (and, when whole
heads or neurons go, faster).

Every method works on the Transformer blocks' matrices (attention `c_attn`/`c_proj`, cross-
attention's too, MLP `c_fc`/`c_proj`), never on embeddings, norms, positions or output heads:

- "magnitude" (Han et al. 2015): zero the `amount` of each matrix's weights with the smallest |w|
  (scope "layer", the default: every matrix ends exactly that sparse, whatever its scale), or
  of all those matrices pooled (scope "global": one threshold, so matrices with smaller weights
  lose more). Shapes stay and no masks or hooks are left: the zeros are in the weights. A dense
  matmul is no faster for them, so the gain is storage: the checkpoint holds those matrices as
  a bitmask plus the surviving values (config.json's "sparsity" section), which
  `lmforge.checkpoint.load_checkpoint` decodes back to dense tensors.
- "heads" (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"): remove `amount` of
  every attention's heads and slice its matrices: the heads' query/key/value rows of `c_attn`
  and their columns of `c_proj`. With grouped-query attention a key/value head goes together
  with the query heads that share it (a whole group).
- "ffn": remove `amount` of every MLP's hidden neurons: their rows of `c_fc` (gate and up rows
  for SwiGLU/GeGLU) and columns of `c_proj`.

Structured pruning removes the same number in every layer, so one config still describes the
model: n_head (and n_kv_head) or mlp_hidden shrink, while the head size stays (`head_size`).
Each layer drops its least important heads/neurons by a score (`weight_scores`, data-free; or
`gradient_scores`, from a few batches). T5's relative position bias is one table per stack shared
by its layers, so there every layer of a stack keeps the same heads.

The pruned model is a new model of the new config (exactly what loading its checkpoint builds);
the model passed in is left as it was. `prune_checkpoint` is the `lmforge prune` command: load,
score, prune, optionally fine-tune to recover (the normal trainer), save, and measure.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.checkpoint import (
    WEIGHTS_FILE,
    copy_weights,
    load_checkpoint,
    resolve_checkpoint_dir,
    save_checkpoint,
)
from lmforge.config import replace
from lmforge.data import open_data
from lmforge.errors import LmforgeError
from lmforge.nn import MLP, RelativePositionBias, SelfAttention
from lmforge.nn.config import GATED_ACTIVATIONS
from lmforge.train import DataConfig, TrainConfig, estimate_loss, train
from lmforge.train.objectives import move_batch
from lmforge.train.trainer import make_objective, resolve_device

METHODS = ("magnitude", "heads", "ffn")
SCOPES = ("layer", "global")
SPARSE_FORMAT = "bitmask"  # numpy.packbits of (w != 0), then the nonzero values in row-major order


def check_amount(amount: float) -> None:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount < 1:
        raise LmforgeError(f"amount must be in [0, 1), the fraction to remove (0.3 = 30%), got {amount!r}")


def prune(
    model: nn.Module, method: str, amount: float, *, scope: str = "layer",
    scores: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A pruned copy of `model`: `method` one of METHODS, `amount` in [0, 1). `scope` is for
    magnitude pruning; `scores` (module name -> importance, from `weight_scores` or
    `gradient_scores`) for heads/ffn, default `weight_scores(model)`."""
    if method not in METHODS:
        raise LmforgeError(f"unknown pruning method {method!r}; choose one of {', '.join(map(repr, METHODS))}")
    if method == "magnitude":
        return prune_magnitude(model, amount, scope)
    return (prune_heads if method == "heads" else prune_ffn)(model, amount, scores)


# ---- what is pruned --------------------------------------------------------------------------
def attentions(model: nn.Module) -> dict[str, SelfAttention]:
    """Every self- and cross-attention, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SelfAttention)}


def mlps(model: nn.Module) -> dict[str, MLP]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MLP)}


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The matrices magnitude pruning works on: the attentions' and MLPs' Linear weights."""
    return {
        f"{prefix}.{child}.weight": linear.weight
        for prefix, module in {**attentions(model), **mlps(model)}.items()
        for child, linear in module.named_children()
        if isinstance(linear, nn.Linear)
    }


# ---- magnitude pruning -----------------------------------------------------------------------
@torch.no_grad()
def prune_magnitude(model: nn.Module, amount: float, scope: str = "layer") -> nn.Module:
    """Zero the `amount` of the block matrices' weights with the smallest |w|: per matrix
    (scope "layer") or over all of them (scope "global"). Ties are broken by position."""
    check_amount(amount)
    if scope not in SCOPES:
        raise LmforgeError(f"unknown scope {scope!r}; choose 'layer' (each matrix) or 'global' (all pooled)")
    pruned = copy.deepcopy(model)
    weights = list(prunable_weights(pruned).values())
    if scope == "layer":
        for w in weights:
            w.masked_fill_(~_keep_largest(w.abs(), amount), 0)
    else:
        keep = _keep_largest(torch.cat([w.abs().flatten() for w in weights]), amount)
        for w, k in zip(weights, keep.split([w.numel() for w in weights])):
            w.masked_fill_(~k.view_as(w), 0)
    return pruned


def _keep_largest(magnitude: torch.Tensor, amount: float) -> torch.Tensor:
    """Boolean mask, False for the round(amount * numel) smallest entries."""
    n_drop = int(amount * magnitude.numel() + 0.5)
    keep = torch.ones(magnitude.numel(), dtype=torch.bool, device=magnitude.device)
    if n_drop:
        keep[torch.topk(magnitude.flatten().float(), n_drop, largest=False).indices] = False
    return keep.view_as(magnitude)


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """(w != 0) of every prunable matrix: what recovery training must keep at zero."""
    return {name: w.detach() != 0 for name, w in prunable_weights(model).items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the weights outside `masks` again (after an optimizer step moved them)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        p = params[name]
        if mask.device != p.device:  # moved once, then reused every step
            mask = masks[name] = mask.to(p.device)
        p.masked_fill_(~mask, 0)


# ---- sparse storage (used by lmforge.checkpoint) ---------------------------------------------
def sparsity_section(model: nn.Module) -> dict[str, Any]:
    """config.json's "sparsity" section: the tensors `save_checkpoint` stores compressed."""
    return {
        "format": SPARSE_FORMAT,
        "tensors": {name: list(w.shape) for name, w in prunable_weights(model).items()},
    }


def encode_sparse(tensors: dict[str, torch.Tensor], section: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Replace each tensor the section names by NAME.sparse_mask (uint8, the packed bits of
    w != 0) and NAME.sparse_values (the nonzeros, 1-D, same dtype): 1 bit + (1 - sparsity) of
    a value per weight. Lossless: the mask comes from the weights themselves."""
    out = dict(tensors)
    for name, shape in section["tensors"].items():
        if name not in out or list(out[name].shape) != list(shape):
            raise LmforgeError(
                f"the sparsity section does not fit the model: {name} is "
                f"{list(out[name].shape) if name in out else 'missing'}, the section says {shape}; "
                "build it with sparsity_section(model) for the model being saved"
            )
        w = out.pop(name).flatten()
        nonzero = (w != 0).cpu()
        out[f"{name}.sparse_mask"] = torch.from_numpy(np.packbits(nonzero.numpy()))
        out[f"{name}.sparse_values"] = w[nonzero.to(w.device)].contiguous()
    return out


def decode_sparse(tensors: dict[str, torch.Tensor], section: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """The dense tensors back from `encode_sparse`'s."""
    if section.get("format") != SPARSE_FORMAT or not isinstance(section.get("tensors"), dict):
        raise LmforgeError(
            f"{where}: config.json's sparsity section has format {section.get('format')!r}; this lmforge "
            f"reads {SPARSE_FORMAT!r} with a tensors table"
        )
    out = dict(tensors)
    for name, shape in section["tensors"].items():
        try:
            packed, values = out.pop(f"{name}.sparse_mask"), out.pop(f"{name}.sparse_values")
        except KeyError:
            raise LmforgeError(f"{where}: {name} is listed as sparse but its mask or values are missing") from None
        numel = int(np.prod(shape))
        nonzero = torch.from_numpy(np.unpackbits(packed.numpy(), count=numel).astype(bool))
        if int(nonzero.sum()) != values.numel():
            raise LmforgeError(
                f"{where}: {name} has {int(nonzero.sum())} weights in its mask but {values.numel()} values"
            )
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[nonzero] = values
        out[name] = dense.view(shape)
    return out


# ---- importance scores -----------------------------------------------------------------------
@torch.no_grad()
def weight_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """Data-free importance, by module name: for an attention one score per key/value group
    (per head without GQA), ||W_v|| * sum of its query heads' ||W_o|| (what a head's output is
    made of; Frobenius norms); for an MLP one per hidden neuron, ||c_fc row|| * ||c_proj column||
    (gated: gate row * up row * c_proj column)."""
    scores = {}
    for name, m in attentions(model).items():
        hd, group = m.head_dim, m.n_head // m.n_kv_head
        w_v = m.c_attn.weight[(m.n_head + m.n_kv_head) * hd :].view(m.n_kv_head, hd, -1)  # (G, D, C)
        w_o = m.c_proj.weight.view(-1, m.n_head, hd)  # (C, H, D)
        scores[name] = w_v.norm(dim=(1, 2)) * w_o.norm(dim=(0, 2)).view(m.n_kv_head, group).sum(1)
    for name, m in mlps(model).items():
        w_in = m.c_fc.weight.norm(dim=1)
        if m.activation in GATED_ACTIVATIONS:
            gate, up = w_in.chunk(2)
            w_in = gate * up
        scores[name] = w_in * m.c_proj.weight.norm(dim=0)
    return {name: s.float() for name, s in scores.items()}


def gradient_scores(
    model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batches: Iterable[Any]
) -> dict[str, torch.Tensor]:
    """Importance from data (Michel et al. 2019, eq. 2): a gate of ones multiplies every head's
    output (and every MLP neuron's) where it enters `c_proj`; a head's score is |dL/d gate|
    summed over the batches, so it estimates how much the loss changes when the head goes. Per
    key/value group with GQA, by module name as `weight_scores`. The model runs in eval mode."""
    modules = {**attentions(model), **mlps(model)}
    gates, handles = {}, []
    for name, m in modules.items():
        heads = isinstance(m, SelfAttention)
        gate = torch.ones(m.n_head if heads else m.c_proj.in_features, device=m.c_proj.weight.device,
                          requires_grad=True)
        handles.append(m.c_proj.register_forward_pre_hook(functools.partial(_gate, gate, m.head_dim if heads else 1)))
        gates[name] = gate
    scores = {name: torch.zeros_like(g) for name, g in gates.items()}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch), list(gates.values()), allow_unused=True)
            for total, grad in zip(scores.values(), grads):
                if grad is not None:
                    total += grad.abs()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for name, m in attentions(model).items():  # query heads -> their key/value groups
        scores[name] = scores[name].view(m.n_kv_head, -1).sum(1)
    return {name: s.detach() for name, s in scores.items()}


def _gate(gate: torch.Tensor, width: int, module: nn.Module, args: tuple) -> tuple:
    """forward pre-hook on `c_proj`: (B, T, n * width) inputs times gate (n,), each repeated width times."""
    x = args[0]
    return (x * gate.repeat_interleave(width).to(x.dtype),)


# ---- structured pruning ----------------------------------------------------------------------
def prune_heads(model: nn.Module, amount: float, scores: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Remove round(amount * n_kv_head) key/value groups (= heads without GQA) from every
    attention, each its least important by `scores` (default `weight_scores`)."""
    check_amount(amount)
    modules = attentions(model)
    first = next(iter(modules.values()))
    n_group, group = first.n_kv_head, first.n_head // first.n_kv_head
    if group == 1:
        unit = "attention heads"
    else:
        unit = (f"key/value groups (n_kv_head={n_group}, each shared by {group} query heads; "
                "grouped-query attention loses whole groups)")
    n_keep = n_group - _count_to_remove(amount, n_group, unit)
    if n_keep == n_group:
        return copy.deepcopy(model)
    scores = scores or weight_scores(model)
    keep = {name: _largest(scores[name], n_keep) for name in modules}
    tables = _shared_bias_tables(model)
    for names in tables.values():  # T5: a stack's layers keep the same heads, best on the whole
        total = sum(_unit_norm(scores[name]) for name in names)
        keep.update({name: _largest(total, n_keep) for name in names})

    tensors = dict(model.state_dict())
    for name, m in modules.items():
        heads = (keep[name][:, None] * group + torch.arange(group)).flatten()  # kept query heads
        q = _rows(heads, m.head_dim)
        k, v = _rows(m.n_head + keep[name], m.head_dim), _rows(m.n_head + m.n_kv_head + keep[name], m.head_dim)
        rows = torch.cat([q, k, v])
        _take(tensors, f"{name}.c_attn.weight", rows, dim=0)
        _take(tensors, f"{name}.c_attn.bias", rows, dim=0)
        _take(tensors, f"{name}.c_proj.weight", q, dim=1)
    for table, names in tables.items():  # (buckets, n_head): one column a head
        heads = (keep[names[0]][:, None] * group + torch.arange(group)).flatten()
        _take(tensors, table, heads, dim=1)
    c = model.config
    config = replace(c, n_head=n_keep * group, n_kv_head=n_keep, head_size=c.head_dim)
    return _rebuild(model, config, tensors)


def prune_ffn(model: nn.Module, amount: float, scores: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Remove round(amount * mlp_hidden) hidden neurons from every MLP, each its least
    important by `scores` (default `weight_scores`)."""
    check_amount(amount)
    hidden = model.config.mlp_hidden
    n_keep = hidden - _count_to_remove(amount, hidden, "MLP hidden neurons")
    if n_keep == hidden:
        return copy.deepcopy(model)
    scores = scores or weight_scores(model)
    tensors = dict(model.state_dict())
    for name, m in mlps(model).items():
        kept = _largest(scores[name], n_keep)
        rows = torch.cat([kept, hidden + kept]) if m.activation in GATED_ACTIVATIONS else kept  # gate, up
        _take(tensors, f"{name}.c_fc.weight", rows, dim=0)
        _take(tensors, f"{name}.c_fc.bias", rows, dim=0)
        _take(tensors, f"{name}.c_proj.weight", kept, dim=1)
    return _rebuild(model, replace(model.config, mlp_hidden=n_keep), tensors)


def _count_to_remove(amount: float, n: int, unit: str) -> int:
    """round(amount * n), keeping at least one; an amount that removes nothing is an error."""
    n_drop = min(int(amount * n + 0.5), n - 1)
    if amount > 0 and n_drop == 0:
        if n == 1:
            raise LmforgeError(f"cannot prune {unit}: there is only one per layer, and at least one must stay")
        raise LmforgeError(
            f"amount={amount} removes none of the {n} {unit} per layer (it rounds to 0); use amount >= "
            f"{0.5 / n:.3g}"
        )
    return n_drop


def _largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in ascending order (so kept units keep their order)."""
    return torch.topk(scores.float().cpu(), k).indices.sort().values


def _unit_norm(scores: torch.Tensor) -> torch.Tensor:
    """Scores / their L2 norm: each layer counts alike when summed (Michel et al. normalise per layer)."""
    return scores.float().cpu() / scores.float().norm().clamp_min(1e-12).cpu()


def _rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of rows unit*size .. unit*size + size - 1 for each unit."""
    return (units[:, None] * size + torch.arange(size)).flatten()


def _take(tensors: dict[str, torch.Tensor], name: str, index: torch.Tensor, dim: int) -> None:
    if name in tensors:  # biases are optional
        tensors[name] = tensors[name].index_select(dim, index.to(tensors[name].device))


def _shared_bias_tables(model: nn.Module) -> dict[str, list[str]]:
    """T5's relative position bias tables (one per stack, a column per head), each with the
    self-attentions of its stack (`STACK.h.i.attn`) that read it."""
    tables = {}
    for name, m in model.named_modules():
        if isinstance(m, RelativePositionBias):
            stack = name.rsplit(".", 1)[0]
            layers = len(model.get_submodule(f"{stack}.h"))
            tables[f"{name}.table.weight"] = [f"{stack}.h.{i}.attn" for i in range(layers)]
    return tables


def _rebuild(model: nn.Module, config: Any, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A model of `config` holding `tensors`, on the device and in the dtype of `model`."""
    p = next(model.parameters())
    with torch.random.fork_rng(devices=[]):  # the throwaway initialisation leaves the caller's RNG alone
        new = type(model)(config).to(device=p.device, dtype=p.dtype)
    copy_weights(new, tensors, "pruned weights")
    return new.train(model.training)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, nonzero parameters), each tensor once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params), sum(int((p != 0).sum()) for p in params)


# ---- the `lmforge prune` command -------------------------------------------------------------
@dataclass
class PruneReport:
    method: str
    amount: float
    removed: str  # what went, e.g. "heads 4 -> 3 per layer"
    params_before: int
    params_after: int
    nonzero_after: int
    bytes_before: int | None  # the weights file's size; None when the source has none
    bytes_after: int
    val_loss_before: float | None = None  # with data only
    val_loss_pruned: float | None = None
    val_loss_recovered: float | None = None  # with recovery: the saved (best) checkpoint's
    recovery_iters: int = 0
    score: str = "weight-norm"  # heads/ffn: "weight-norm" or "gradient"
    out: Path | None = None


def prune_checkpoint(
    src: str | Path,
    dst: str | Path,
    method: str,
    amount: float,
    *,
    scope: str = "layer",
    data: DataConfig | None = None,
    train_config: TrainConfig | None = None,
    recover: bool = False,
    score_batches: int = 8,
    progress: bool = True,
) -> PruneReport:
    """Prune checkpoint (or run folder) SRC into DST.

    `data`, a prepared folder, gives heads/ffn gradient importance scores (`score_batches`
    training batches) and the val losses before, after pruning and after recovery.
    `train_config` sets their batch size, eval_iters and device, and with `recover` the recovery
    fine-tuning: its max_iters steps of the family's pretraining objective through the normal
    trainer. Without recovery DST is a checkpoint folder; with it DST is a run folder
    (best/, last/, metrics.jsonl, loss.png) as `lmforge train` and `lmforge finetune` write, and
    its best checkpoint (lowest val loss, the pruned model's own at step 0 included) is the
    result. Magnitude pruning re-applies its zeros after every recovery step.
    """
    if method not in METHODS:
        raise LmforgeError(f"unknown pruning method {method!r}; choose one of {', '.join(map(repr, METHODS))}")
    check_amount(amount)
    if score_batches < 1:
        raise LmforgeError(f"score_batches must be >= 1, got {score_batches}")
    if recover and data is None:
        raise LmforgeError(
            "recovery fine-tuning needs data: pass --recover-data DATA_DIR (a folder made by `lmforge prepare`)"
        )
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise LmforgeError(f"--out {str(dst)!r} exists and is not empty; choose a new folder")
    tc = train_config or TrainConfig()
    src_dir = resolve_checkpoint_dir(src)
    ckpt = load_checkpoint(src_dir, device=resolve_device(tc.device))
    device = next(ckpt.model.parameters()).device
    weights = src_dir / WEIGHTS_FILE
    report = PruneReport(
        method, amount, "", count_params(ckpt.model)[0], 0, 0, weights.stat().st_size if weights.is_file() else None, 0
    )

    objective = None
    if data is not None:
        data_dir = open_data(data.path)
        objective = make_objective(ckpt.model.config, tc, data, data_dir)
        has_val = data_dir.tokens("val") > 0

        def val_loss(model: nn.Module) -> float:
            metrics = estimate_loss(model, objective, tc, contextlib.nullcontext(), has_val)  # fp32
            return metrics["val_loss" if has_val else "train_loss"]

        report.val_loss_before = val_loss(ckpt.model)
    scores = None
    if objective is not None and method != "magnitude":
        sampler = objective.sampler("train", tc.batch_size, seed=tc.seed)
        batches = (move_batch(sampler.next_batch(), device) for _ in range(score_batches))
        scores, report.score = gradient_scores(ckpt.model, objective.loss, batches), "gradient"
    pruned = prune(ckpt.model, method, amount, scope=scope, scores=scores)
    report.removed = _what_went(ckpt.model.config, pruned, method, amount, scope)
    if objective is not None:
        report.val_loss_pruned = val_loss(pruned)

    extra: dict[str, Any] = {"prune": {
        "method": method, "amount": amount, "source": str(src_dir), "params_before": report.params_before,
        **({"scope": scope} if method == "magnitude" else {"score": report.score}),
    }}
    if method == "magnitude":
        extra["sparsity"] = sparsity_section(pruned)  # the trainer's checkpoints are stored sparse too
    if not recover:
        save_checkpoint(dst, pruned, ckpt.tokenizer, extra=extra, source_tokenizer=ckpt.source_tokenizer)
    else:
        on_step = functools.partial(apply_masks, masks=zero_masks(pruned)) if method == "magnitude" else None
        result = train(pruned.config, tc, data, dst, progress=progress, init_model=pruned, extra_meta=extra,
                       on_step=on_step)
        report.recovery_iters = result.iters
        pruned = load_checkpoint(dst, device=device).model
        report.val_loss_recovered = val_loss(pruned)
    report.params_after, report.nonzero_after = count_params(pruned)
    report.out = resolve_checkpoint_dir(dst)
    report.bytes_after = (report.out / WEIGHTS_FILE).stat().st_size
    return report


def _what_went(before: Any, pruned: nn.Module, method: str, amount: float, scope: str) -> str:
    after = pruned.config
    if method == "heads":
        kv = f" (key/value heads {before.n_kv_head} -> {after.n_kv_head})" if before.n_kv_head != before.n_head else ""
        return f"attention heads {before.n_head} -> {after.n_head} per layer{kv}, head size {after.head_dim}"
    if method == "ffn":
        return f"MLP hidden neurons {before.mlp_hidden} -> {after.mlp_hidden} per layer"
    return f"{amount:.0%} of the block matrices' weights zeroed ({'per matrix' if scope == 'layer' else 'global'})"


def report_lines(report: PruneReport) -> list[str]:
    """What `lmforge prune` prints."""
    def size(n: int | None) -> str:
        return "n/a" if n is None else f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"

    nonzero = f" ({report.nonzero_after:,} nonzero)" if report.method == "magnitude" else ""
    lines = [
        f"pruned ({report.method}): {report.removed}",
        f"parameters: {report.params_before:,} -> {report.params_after:,}{nonzero}",
        f"file size: {size(report.bytes_before)} -> {size(report.bytes_after)}",
    ]
    if report.method != "magnitude":
        lines.append(f"importance: {report.score} scores")
    if report.val_loss_before is not None:
        line = f"val loss: {report.val_loss_before:.4f} before, {report.val_loss_pruned:.4f} pruned"
        if report.val_loss_recovered is not None:
            line += f", {report.val_loss_recovered:.4f} after {report.recovery_iters} recovery steps"
        lines.append(line)
    lines.append(f"saved to {report.out}")
    return lines


__all__ = [
    "METHODS", "PruneReport", "apply_masks", "attentions", "decode_sparse", "encode_sparse", "gradient_scores",
    "mlps", "prunable_weights", "prune", "prune_checkpoint", "prune_ffn", "prune_heads", "prune_magnitude",
    "report_lines", "sparsity_section", "weight_scores", "zero_masks",
]

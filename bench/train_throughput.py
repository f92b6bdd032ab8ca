"""Training throughput on CPU: lmforge `GPT` against Hugging Face `GPT2LMHeadModel`.

Both models get the same architecture (GPT-2: pre-norm LayerNorm, learned positions, tanh GELU,
tied embeddings, no dropout), the same batch of random token ids, and the same optimizer: AdamW
with weight decay on the Linear/Conv1D matrices only, in torch's fused flavour (what
`make_optimizer` picks, and what HF's Trainer defaults to with torch >= 2.8). One training step
is forward, cross-entropy (computed outside both models), backward, gradient clipping at 1.0,
optimizer step.

Settings are measured in one process, in alternating rounds (HF, lmforge, ..., HF, lmforge,
...), and each setting's median round is reported: other work on a shared machine then slows
every setting alike instead of whichever ran at the time. Warm-up steps are not timed. All
settings run twice: first with glibc's allocator as a process starts, then after
`tune_cpu_allocator()` (which lmforge's training applies), so that its gain is visible apart
from the model's and precision's.

MFU (model FLOPs utilisation) is achieved FLOP/s (6N + 12*L*d*T per token) over the matmul
peak `measure_matmul_peak` measures on this machine, for fp32 and for bf16.

    python bench/train_throughput.py                 # ~3 minutes on 2 Zen4 cores
    python bench/train_throughput.py --rounds 3 --json results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lmforge.models.gpt import GPT, GPTConfig  # noqa: E402
from lmforge.train.allocator import tune_cpu_allocator  # noqa: E402
from lmforge.train.optim import make_optimizer  # noqa: E402
from lmforge.train.precision import (  # noqa: E402
    autocast_context,
    measure_matmul_peak,
    resolve_precision,
)

VOCAB = 65  # tiny Shakespeare's characters
LR, WEIGHT_DECAY, BETAS = 1e-3, 0.1, (0.9, 0.99)

# name, model shape, batch size, steps per timed round
CONFIGS = [
    dict(
        name="4L/4H/128/T64/B12", n_layer=4, n_head=4, n_embd=128, block_size=64, batch=12, steps=30
    ),
    dict(
        name="6L/6H/384/T256/B8", n_layer=6, n_head=6, n_embd=384, block_size=256, batch=8, steps=3
    ),
]


def hf_gpt2(c: dict) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=c["block_size"],
        n_embd=c["n_embd"],
        n_layer=c["n_layer"],
        n_head=c["n_head"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,  # GPT-2's defaults (50256) lie outside this 65-token vocabulary
        eos_token_id=None,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config)


def hf_optimizer(model: nn.Module) -> torch.optim.AdamW:
    """`make_optimizer`'s groups for HF's GPT-2: decay the Conv1D matrices, not wte/wpe/norms/biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # the tied lm_head appears once, as wte
        is_table = name.endswith(("wte.weight", "wpe.weight"))
        (decay if p.dim() == 2 and not is_table else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=True)


def make_step(model: nn.Module, opt: torch.optim.Optimizer, batch, precision: str, hf: bool):
    x, y = batch

    def step() -> None:
        with autocast_context("cpu", precision):
            logits = model(input_ids=x, use_cache=False).logits if hf else model(x)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


class Contest:
    """One config's settings (models, optimizers, batch), built once and timed in each phase."""

    def __init__(self, c: dict, steps: int):
        self.name, self.steps = c["name"], steps
        B, T = c["batch"], c["block_size"]
        self.tokens_per_step = B * T
        gen = torch.Generator().manual_seed(1337)
        self.batch = (
            torch.randint(0, VOCAB, (B, T), generator=gen),
            torch.randint(0, VOCAB, (B, T), generator=gen),
        )
        torch.manual_seed(0)
        hf = hf_gpt2(c).train()
        cfg = GPTConfig(
            vocab_size=VOCAB,
            block_size=T,
            n_layer=c["n_layer"],
            n_head=c["n_head"],
            n_embd=c["n_embd"],
            activation="gelu_tanh",
            dropout=0.0,
        )
        self.ours = {p: GPT(cfg).train() for p in ("fp32", "bf16")}
        self.flops_per_token = self.ours["fp32"].flops_per_token()
        self.step_fns = {"HF fp32": make_step(hf, hf_optimizer(hf), self.batch, "fp32", hf=True)}
        for p, model in self.ours.items():
            opt = make_optimizer(model, LR, WEIGHT_DECAY, BETAS)
            self.step_fns[f"lmforge {p}"] = make_step(model, opt, self.batch, p, hf=False)

    def run(self, rounds: int, warmup: int) -> dict[str, float]:
        """Median tokens/s of each setting over `rounds` alternating rounds."""
        for step in self.step_fns.values():
            for _ in range(warmup):
                step()
        tok_s: dict[str, list[float]] = {name: [] for name in self.step_fns}
        for _ in range(rounds):
            for name, step in self.step_fns.items():
                t0 = time.perf_counter()
                for _ in range(self.steps):
                    step()
                tok_s[name].append(self.tokens_per_step * self.steps / (time.perf_counter() - t0))
        return {name: statistics.median(v) for name, v in tok_s.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per round (default: 30 for 4L, 3 for 6L)",
    )
    ap.add_argument(
        "--rounds", type=int, default=5, help="alternating rounds; the median is reported"
    )
    ap.add_argument(
        "--warmup", type=int, default=3, help="untimed steps per setting before each phase"
    )
    ap.add_argument("--json", type=str, default=None, help="write the results to this file")
    args = ap.parse_args()

    peaks = {
        p: measure_matmul_peak("cpu", d)
        for p, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; matmul peak "
        f"fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s",
        flush=True,
    )
    t_start = time.perf_counter()
    contests = [Contest(c, args.steps or c["steps"]) for c in CONFIGS]
    results = {c.name: {"flops_per_token": c.flops_per_token, "tok_s": {}} for c in contests}
    # Phase 1 runs with glibc's allocator as every process starts; phase 2 after
    # tune_cpu_allocator(), which lmforge's training applies. The setting cannot be undone, so
    # the phases run in this order, each alternating over all settings.
    for phase in ("glibc default", "tuned"):
        if phase == "tuned":
            tune_cpu_allocator()
        for c in contests:
            tok_s = c.run(args.rounds, args.warmup)
            if phase == "tuned":  # what the library's "auto" picks, timed on the model itself
                auto, probe = resolve_precision("auto", c.ours["bf16"], lambda c=c: c.batch, "cpu")
                tok_s[f"lmforge auto ({auto})"] = tok_s[f"lmforge {auto}"]
                results[c.name]["auto"] = {"precision": auto, **probe}
                print(
                    f"{c.name}: auto -> {auto} (probe fwd+bwd fp32 {probe['fp32_s'] * 1e3:.0f} ms, "
                    f"bf16 {probe['bf16_s'] * 1e3:.0f} ms)",
                    flush=True,
                )
            results[c.name]["tok_s"][phase] = tok_s
            print(
                f"{c.name}, allocator {phase}: "
                + ", ".join(f"{k} {v:,.0f}" for k, v in tok_s.items()),
                flush=True,
            )

    print(
        "\n| config | allocator | setting | tok/s | vs HF, same allocator | MFU (fp32 peak) | MFU (bf16 peak) |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for name, r in results.items():
        for phase, tok_s in r["tok_s"].items():
            for setting, v in tok_s.items():
                achieved = v * r["flops_per_token"]
                print(
                    f"| {name} | {phase} | {setting} | {v:,.0f} | {v / tok_s['HF fp32']:.2f}x | "
                    f"{achieved / peaks['fp32']:.1%} | {achieved / peaks['bf16']:.1%} |"
                )
    print()
    for name, r in results.items():
        auto = r["auto"]["precision"]
        ours, theirs = (
            r["tok_s"]["tuned"][f"lmforge {auto}"],
            r["tok_s"]["glibc default"]["HF fp32"],
        )
        print(
            f"{name}: lmforge as it trains (auto -> {auto}, tuned allocator) {ours:,.0f} tok/s "
            f"vs HF as shipped (fp32, glibc default) {theirs:,.0f} tok/s: {ours / theirs:.2f}x"
        )
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_flops": peaks, "results": results}, indent=2))


if __name__ == "__main__":
    main()

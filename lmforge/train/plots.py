"""Loss curves from a run's metrics.jsonl, drawn with matplotlib (headless Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


ACCURACIES = (("mlm_acc", "MLM accuracy"), ("nsp_acc", "NSP accuracy"), ("acc", "token accuracy"))


def plot_metrics(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """Plot training loss (per log interval) and evaluated train/val loss against the step; for
    BERT pretraining a second panel shows the evaluated MLM and NSP accuracies, for an
    encoder-decoder the target-token accuracy."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    has_acc = any(f"{split}_{key}" in r for r in evals for split in ("train", "val") for key, _ in ACCURACIES)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(14 if has_acc else 8, 5), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(
            [r["iter"] for r in train],
            [r["loss"] for r in train],
            lw=0.8,
            alpha=0.5,
            label="train loss (batch)",
        )
    for key, style in (("train_loss", "o-"), ("val_loss", "s-")):
        points = [(r["iter"], r[key]) for r in evals if key in r]
        if points:
            ax.plot(*zip(*points), style, ms=3, label=key.replace("_", " ") + " (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss" if has_acc else "cross-entropy loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if has_acc:
        ax = axes[0][1]
        for key, label in ACCURACIES:
            for split, style in (("train", "o--"), ("val", "s-")):
                points = [(r["iter"], r[f"{split}_{key}"]) for r in evals if f"{split}_{key}" in r]
                if points:
                    ax.plot(*zip(*points), style, ms=3, label=f"{split} {label}")
        if any("val_nsp_acc" in r or "train_nsp_acc" in r for r in evals):
            ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="NSP chance (0.5)")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def plot_multitask(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """Multi-task fine-tuning (`lmforge.train.multitask`): each task's training loss (its mean
    over the steps it was drawn since the previous evaluation) and its dev score against the
    step, and the weighted overall score that picks `best`."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(records[0]["tasks"])
    fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(14, 5))
    for name in names:
        points = [(r["step"], r["tasks"][name]["train_loss"]) for r in records
                  if r["tasks"][name]["train_loss"] is not None]
        if points:
            loss_ax.plot(*zip(*points), "o-", ms=3, label=name)
        score_ax.plot([r["step"] for r in records], [r["tasks"][name]["score"] for r in records],
                      "s-", ms=3, label=name)
    score_ax.plot([r["step"] for r in records], [r["score"] for r in records], "k--", lw=1.5,
                  label="weighted score")
    loss_ax.set_yscale("log")  # an MLM loss (~2-5 nats) and a classifier's (~0.1) on one axis
    loss_ax.set_ylabel("train loss (unweighted)")
    score_ax.set_ylabel("dev score (accuracy, entity F1, MLM accuracy)")
    score_ax.set_ylim(0, 1)
    for ax in (loss_ax, score_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)

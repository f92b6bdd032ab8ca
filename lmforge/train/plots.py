"""Loss curves from a run's metrics.jsonl, drawn with matplotlib (headless Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """Plot training loss (per log interval) and evaluated train/val loss against the step."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
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
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)

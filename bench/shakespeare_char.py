"""nanoGPT's CPU "baby GPT" recipe on tiny Shakespeare (characters), run through lmforge as a user
would: `lmforge.data.prepare` (char tokenizer, 90/10 split) then `lmforge.train.train`.

The recipe (nanoGPT README, "I only have a macbook"): characters as tokens (65 of them), first
90% for training and last 10% for validation; 4 layers, 4 heads, 128 wide, context 64, no
biases, no dropout; batch 12, 2000 iterations, AdamW (beta2 0.99, weight decay 0.1), lr 1e-3
warmed up over 100 iterations and cosine-decayed to 1e-4 at 2000, gradients clipped at 1.0;
every 250 iterations the loss is estimated as the mean over 20 random batches of each split.
nanoGPT reaches val 1.886 in 114 s on this machine class, timing its loop including evals.

The wall time reported is the whole `train()` call: precision probe, evaluations, checkpoint
writes and the loss plot included. Differences from nanoGPT: embeddings are not weight-decayed,
AdamW is the fused kernel, precision is picked by measurement (`train.precision = "auto"`).

    python bench/shakespeare_char.py                  # the recipe, ~1.5 minutes
    python bench/shakespeare_char.py --max-time 105 --batch-size 32 --iters 100000 --lr-decay-iters 1200 --lr 2e-3
                                                      # nanoGPT's time budget, a bigger batch, lr 2e-3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from lmforge.data import PrepareConfig, TokenData, prepare  # noqa: E402
from lmforge.eval import perplexity  # noqa: E402
from lmforge.models import GPTConfig  # noqa: E402
from lmforge.train import DataConfig, TrainConfig, train  # noqa: E402
from lmforge.train.plots import read_metrics  # noqa: E402

NANOGPT = {"val_loss": 1.886, "wall_s": 114.0}  # same recipe, same machine class
DEFAULT_DATA = Path(__file__).resolve().parents[1] / "../shared/data/tinyshakespeare/input.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="tiny Shakespeare input.txt")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--lr-decay-iters", type=int, default=None, help="default: --iters")
    ap.add_argument("--max-time", type=float, default=None, help="stop training after this many seconds")
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (min_lr is a tenth of it)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    ap.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one)")
    ap.add_argument("--json", type=str, default=None, help="write the results to this file")
    args = ap.parse_args()
    if not args.data.is_file():
        sys.exit(f"error: no tiny Shakespeare at {args.data}; pass --data PATH/input.txt")

    work = Path(tempfile.mkdtemp(prefix="shakespeare-"))
    out = args.out or work / "run"
    prepare(PrepareConfig(source=str(args.data), tokenizer="char", val_fraction=0.1), work / "data", progress=False)
    data = TokenData.open(work / "data")
    model_config = GPTConfig(vocab_size=data.vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128,
                             dropout=0.0, bias=False)
    train_config = TrainConfig(
        batch_size=args.batch_size, max_iters=args.iters, max_time=args.max_time, lr=args.lr, min_lr=args.lr / 10,
        lr_schedule="cosine", warmup_iters=100, lr_decay_iters=args.lr_decay_iters or args.iters,
        weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0, eval_interval=250, eval_iters=20,
        log_interval=50, precision=args.precision, seed=args.seed,
    )
    t0 = time.perf_counter()
    result = train(model_config, train_config, DataConfig(str(work / "data")), out, progress=False)
    wall_s = time.perf_counter() - t0

    from lmforge.checkpoint import load_checkpoint

    model = load_checkpoint(out / "last").model
    val_ids = [int(t) for shard in data.shards("val") for t in shard]
    full = perplexity(model, val_ids, context=64, batch_size=256)
    final = result.last_eval
    print(f"\nvocab {data.vocab_size}, {data.tokens('train'):,} train / {data.tokens('val'):,} val characters")
    print(f"iters {result.iters} ({result.stop_reason}), batch {args.batch_size}")
    print(f"val loss {final['val_loss']:.4f} (nanoGPT-style estimate; nanoGPT {NANOGPT['val_loss']}), "
          f"full val set {full['loss']:.4f}")
    print(f"train() wall time {wall_s:.1f} s incl. probe, evals and checkpoints "
          f"(nanoGPT {NANOGPT['wall_s']:.0f} s: {NANOGPT['wall_s'] / wall_s:.2f}x faster)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "val_loss": final["val_loss"], "train_loss": final["train_loss"], "val_loss_full": full["loss"],
            "wall_s": wall_s, "iters": result.iters, "batch_size": args.batch_size,
            "speedup_vs_nanogpt": NANOGPT["wall_s"] / wall_s,
            "evals": [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"],
        }, indent=2))


if __name__ == "__main__":
    main()

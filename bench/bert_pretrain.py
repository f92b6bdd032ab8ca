"""From-scratch `bert-mini` MLM + NSP pretraining on the built-in corpus: do the MLM and NSP
accuracies rise well above chance?

    python bench/bert_pretrain.py [--minutes 10] [--out runs/bert-pretrain]

Runs what a user would (`lmforge prepare --data builtin:pydocs --tokenizer wordpiece`, then
`lmforge train --preset bert-mini`) through the Python API, then prints the evaluated curves
beside two chance levels measured on the same validation batches the trainer scores:
- NSP: 0.5 (half the pairs are true next segments);
- MLM: the accuracy of always predicting the most frequent masked token (a unigram guess).
The run's `loss.png` has the loss and accuracy panels.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

from lmforge.data import PrepareConfig, TokenData, prepare
from lmforge.data.mlm import IGNORE_INDEX, PretrainingBatches
from lmforge.models.bert import BERT_PRESETS, BertConfig
from lmforge.train import DataConfig, TrainConfig, train


def unigram_chance(data: TokenData, tc: TrainConfig, dc: DataConfig) -> float:
    """Accuracy of always guessing the most frequent target, on the trainer's val batches."""
    sampler = PretrainingBatches(data, "val", tc.batch_size, dc.max_length, seed=tc.seed + 1000)
    counts: collections.Counter[int] = collections.Counter()
    for _ in range(tc.eval_iters):
        labels = sampler.next_batch()["labels"]
        counts.update(labels[labels != IGNORE_INDEX].tolist())
    return counts.most_common(1)[0][1] / sum(counts.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--out", default="runs/bert-pretrain")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    out = Path(args.out)
    data_dir = out / "data"
    t0 = time.perf_counter()
    if not (data_dir / "manifest.json").is_file():
        prepare(PrepareConfig("builtin:pydocs", tokenizer="wordpiece", vocab_size=args.vocab_size),
                data_dir, progress=False)
    data = TokenData.open(data_dir)
    print(f"prepared {data} in {time.perf_counter() - t0:.0f}s; "
          f"{data.manifest['sentences']['train']['sentences']} train sentences in "
          f"{data.manifest['sentences']['train']['documents']} documents")

    model = BertConfig(**BERT_PRESETS["bert-mini"], vocab_size=data.vocab_size, head="pretraining",
                       pad_token_id=data.tokenizer.pad_id)
    tc = TrainConfig(batch_size=args.batch_size, max_iters=100_000, max_time=args.minutes * 60,
                     lr=args.lr, warmup_iters=100, eval_interval=100,
                     lr_decay_iters=max(200, int(args.minutes * 90)),  # ~1.5 steps/s on 2 cores
                     eval_iters=10, log_interval=20)
    dc = DataConfig(str(data_dir), max_length=128)
    result = train(model, tc, dc, out / "run", progress=False)

    chance = unigram_chance(data, tc, dc)
    evals = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    print(f"\n{'iter':>6} {'val loss':>9} {'MLM acc':>8} {'MLM ppl':>9} {'NSP acc':>8} "
          f"{'train MLM':>10} {'train NSP':>10}")
    for r in evals:
        print(f"{r['iter']:>6} {r['val_loss']:>9.3f} {r['val_mlm_acc']:>8.3f} {r['val_mlm_ppl']:>9.1f} "
              f"{r['val_nsp_acc']:>8.3f} {r['train_mlm_acc']:>10.3f} {r['train_nsp_acc']:>10.3f}")
    best = min(evals, key=lambda r: r["val_loss"])
    print(f"\nchance: MLM {chance:.3f} (most frequent target), NSP 0.500")
    print(f"best val (iter {best['iter']}): MLM acc {best['val_mlm_acc']:.3f} "
          f"({best['val_mlm_acc'] / chance:.1f}x chance), NSP acc {best['val_nsp_acc']:.3f}")
    print(f"{result.iters} steps in {result.seconds:.0f}s ({result.stop_reason}); "
          f"curves in {out / 'run' / 'loss.png'}")


if __name__ == "__main__":
    main()

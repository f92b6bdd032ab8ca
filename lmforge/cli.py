"""`lmforge` command line: one short function per stage, over the library.

    lmforge quickstart                  prepare the built-in corpus, train a small GPT, sample from it
    lmforge prepare --data SRC ...      clean text, train a tokenizer, write token shards (or pairs)
    lmforge train --data DIR --out RUN  pretrain (or --resume) a GPT, a BERT (--preset bert-mini) or
                                        an encoder-decoder (--preset transformer-tiny, t5-tiny)
    lmforge generate CKPT --prompt ...  sample text
    lmforge translate CKPT --text ...   translate / summarise with an encoder-decoder
    lmforge eval CKPT --text FILE       loss and perplexity of a file (or BLEU/chrF/ROUGE)
    lmforge fill-mask CKPT TEXT         top tokens for each [MASK] (BERT)
    lmforge embed CKPT --text ...       sentence embeddings (BERT)
    lmforge finetune --base CKPT ...    fine-tune BERT (classification, NER), an encoder-decoder, or a
                                        GPT on conversations (--task chat); several BERT tasks over one
                                        encoder with --task multitask --config FILE
    lmforge chat CKPT                   chat in the terminal with the checkpoint's chat template
    lmforge predict CKPT --text ...     labels or entities from a fine-tuned checkpoint
    lmforge distill --teacher CKPT ...  distil a GPT or BERT teacher into a smaller student
    lmforge prune CKPT --method M ...   remove weights, attention heads or MLP neurons (+ recovery)
    lmforge quantize CKPT --scheme S    int8 / int4 weights (and int8 activations) for a smaller model
    lmforge lora merge BASE ADAPTER     fold a LoRA adapter (finetune/train --lora) into its base checkpoint
    lmforge convert SRC DST             lmforge <-> Hugging Face checkpoints
    lmforge serve CKPT                  OpenAI-compatible server with continuous batching

User errors (bad config, missing data, ...) print one line `lmforge: error: ...` and exit with 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from lmforge.errors import LmforgeError


# ---- prepare ---------------------------------------------------------------------------------
def cmd_prepare(args: argparse.Namespace) -> None:
    from lmforge.data import PrepareConfig, prepare
    from lmforge.data.prepare import tokenizer_of_checkpoint

    tokenizer = source_tokenizer = None
    if args.tokenizer_from is not None:
        # a given tokenizer has its own kind, size and special tokens: options that shape a
        # trained one would be silently ignored
        wrong = [f"--{name.replace('_', '-')}" for name in ("tokenizer", "vocab_size", "sentinels")
                 if getattr(args, name)] + ["--separate-tokenizers"] * args.separate_tokenizers
        if wrong:
            raise LmforgeError(f"--tokenizer-from uses the checkpoint's tokenizer as it is; drop {', '.join(wrong)}")
        tokenizer, source_tokenizer = tokenizer_of_checkpoint(args.tokenizer_from)
    config = PrepareConfig(
        source=args.data, tokenizer=tokenizer.kind if tokenizer else args.tokenizer or "bpe",
        vocab_size=args.vocab_size, tokenizer_from=args.tokenizer_from,
        val_fraction=args.val_fraction, text_field=args.text_field, sentinels=args.sentinels or 0,
        target=args.target, source_field=args.source_field, target_field=args.target_field,
        val_source=args.val_data, val_target=args.val_target, max_length=args.max_length,
        separate_tokenizers=args.separate_tokenizers,
    )
    manifest = prepare(config, args.out, progress=not args.no_progress, tokenizer=tokenizer,
                       source_tokenizer=source_tokenizer)
    if manifest.get("format") == "parallel":
        splits, dropped = manifest["splits"], manifest["dropped"]
        print(
            f"prepared {splits['train']['pairs']:,} train + {splits['val']['pairs']:,} val sentence pairs "
            f"({splits['train']['source_tokens']:,} source + {splits['train']['target_tokens']:,} target "
            f"train tokens; "
            + (f"bpe vocab {manifest['source_vocab_size']} source + {manifest['target_vocab_size']} target"
               if manifest["separate_tokenizers"] else f"joint bpe vocab {manifest['vocab_size']}")
            + f") in {args.out}"
        )
        lost = {s: d["empty"] + d["too_long"] for s, d in dropped.items()}
        if any(lost.values()):
            print(f"dropped pairs (an empty side, or a side over {manifest['max_length']} tokens): "
                  + ", ".join(f"{s} {n:,}" for s, n in lost.items()))
        for warning in manifest.get("warnings", []):
            print(f"warning: {warning}")
        return
    tokens = manifest["tokens"]
    print(
        f"prepared {manifest['documents']} documents -> {tokens['train']:,} train + {tokens['val']:,} val tokens "
        f"({manifest['tokenizer']} tokenizer, vocab {manifest['vocab_size']}) in {args.out}"
    )
    for warning in manifest.get("warnings", []):
        print(f"warning: {warning}")


# ---- train -----------------------------------------------------------------------------------
def build_run_configs(
    data: str | None, out: str, preset: str | None, config_file: str | None, overrides: list[str], resume: bool
):
    """Merge, lowest priority first: preset (or the resumed run's config), config file, --set.

    The model family comes from the preset (`gpt-*`, `bert-*`, `transformer-*`/`t5-*`), else from
    a resumed run, else from `train.objective` (mlm/mlm_nsp mean a BERT, seq2seq/span_corruption
    an encoder-decoder), else from the data (sentence pairs mean an encoder-decoder), else it is
    a GPT (`gpt-tiny`).
    """
    from lmforge.checkpoint import read_meta
    from lmforge.config import from_dict, load_config_file, parse_overrides
    from lmforge.models.bert import BERT_PRESETS, BertConfig
    from lmforge.models.encoder_decoder import ENCDEC_PRESETS, EncoderDecoderConfig
    from lmforge.models.gpt import GPT_PRESETS, GPTConfig
    from lmforge.train import DataConfig, TrainConfig

    presets = {**GPT_PRESETS, **BERT_PRESETS, **ENCDEC_PRESETS}
    family_presets = {"gpt": GPT_PRESETS, "bert": BERT_PRESETS, "encoder-decoder": ENCDEC_PRESETS}
    sections = {"model": GPTConfig, "train": TrainConfig, "data": DataConfig}
    raw: dict[str, dict] = {name: {} for name in sections}
    family = None
    if resume:
        last = Path(out) / "last"
        if not (last / "config.json").is_file():
            raise LmforgeError(f"cannot resume: no checkpoint at {str(last)!r} (start without --resume)")
        meta = read_meta(last)
        raw = {name: dict(meta.get(name, {})) for name in sections}
        family = meta.get("model_type", "gpt")
    file_sections = load_config_file(config_file) if config_file else {}
    preset = preset or file_sections.pop("preset", None)
    if preset is not None:
        if preset not in presets:
            raise LmforgeError(f"unknown preset {preset!r}; choose one of: {', '.join(presets)}")
        if resume:
            raise LmforgeError("--preset cannot change the model of a run being resumed; drop --preset")
        family = next(f for f, names in family_presets.items() if preset in names)
    for name, values in file_sections.items():
        if name not in sections:
            raise LmforgeError(
                f"config file {config_file!r} has unknown section [{name}]; valid sections are: "
                f"{', '.join(sections)} (and a top-level preset)"
            )
        if not isinstance(values, dict):
            raise LmforgeError(f"config file {config_file!r}: [{name}] must be a table of key = value")
    if family is None:  # no preset: the objective says which family
        objective = str(file_sections.get("train", {}).get("objective", "auto"))
        for key, value in (pair.split("=", 1) for pair in overrides if "=" in pair):
            if key.strip() in ("train.objective", "objective"):
                objective = value.strip()
        family = {"mlm": "bert", "mlm_nsp": "bert", "seq2seq": "encoder-decoder",
                  "span_corruption": "encoder-decoder"}.get(objective)
        if family is None and data is not None and objective == "auto":
            from lmforge.data import open_data
            from lmforge.data.parallel import ParallelData

            family = "encoder-decoder" if isinstance(open_data(data), ParallelData) else None
        family = family or "gpt"
    sections["model"] = {"bert": BertConfig, "encoder-decoder": EncoderDecoderConfig}.get(family, GPTConfig)
    if not resume:
        default = {"gpt": "gpt-tiny", "bert": "bert-mini", "encoder-decoder": "transformer-tiny"}[family]
        raw["model"].update(presets[preset or default])
    for name, values in file_sections.items():
        raw[name].update(values)
    if data is not None:
        raw["data"]["path"] = data
    for name, values in parse_overrides(overrides, sections).items():
        raw[name].update(values)
    data_config = from_dict(DataConfig, raw["data"], "data")
    if not resume:  # the vocabulary and special tokens come from the data's tokenizer
        from lmforge.data import open_data

        data_dir = open_data(data_config.path)
        raw["model"].setdefault("vocab_size", data_dir.vocab_size)
        tokenizer = data_dir.tokenizer
        if family == "bert":
            raw["model"].setdefault("pad_token_id", tokenizer.pad_id)
        if family == "encoder-decoder":
            if tokenizer.pad_id is None or tokenizer.eos_id is None:
                raise LmforgeError(
                    "an encoder-decoder needs a tokenizer with padding and end-of-sequence tokens: "
                    "prepare parallel data (--target), or a stream with --sentinels N for span corruption"
                )
            raw["model"].setdefault("pad_token_id", tokenizer.pad_id)
            raw["model"].setdefault("decoder_start_token_id", tokenizer.pad_id)  # as T5
            if getattr(data_dir, "source_tokenizer", None) is not None:  # one table per side
                raw["model"].setdefault("share_embeddings", False)
            raw["model"].setdefault("eos_token_id", tokenizer.eos_id)
    if family == "bert" and "head" not in raw["model"]:
        # pretraining: an MLM head, with NSP unless the objective is MLM alone
        raw["model"]["head"] = "mlm" if raw["train"].get("objective") == "mlm" else "pretraining"
    model_config = from_dict(sections["model"], raw["model"], "model")
    train_config = from_dict(TrainConfig, raw["train"], "train")
    return model_config, train_config, data_config


def cmd_train(args: argparse.Namespace) -> None:
    from lmforge.train import train
    from lmforge.train.lora import BLOCK_LINEARS

    if args.data is None and not args.resume:
        raise LmforgeError("--data DATA_DIR is required (a folder made by `lmforge prepare`)")
    lora = _lora_config(args, BLOCK_LINEARS)
    if args.resume and (args.init_from or lora is not None):
        raise LmforgeError(f"--resume continues the run with its own settings (its base and LoRA included); "
                           f"drop {', '.join(['--init-from'] * bool(args.init_from) + _lora_flags_given(args))}")
    if lora is not None and args.init_from is None and not args.resume:
        raise LmforgeError("--lora trains adapters over a pretrained model, not random weights: add "
                           "--init-from CKPT (an lmforge checkpoint or run folder, or a Hugging Face folder)")
    if args.nproc is not None:
        if args.nproc < 1:
            raise LmforgeError(f"--nproc must be >= 1, got {args.nproc}")
        if "WORLD_SIZE" in os.environ:
            raise LmforgeError("--nproc starts torchrun itself; drop it when running under torchrun")
        if args.nproc > 1:
            from lmforge.train.distributed import relaunch

            relaunch(args.nproc, _train_args(args))  # each rank runs this command without --nproc
            return
    init = _init_from(args) if args.init_from is not None else None
    model_config, train_config, data_config = build_run_configs(
        args.data, args.out, args.preset, args.config, args.set or [], args.resume
    )
    if init is not None:  # the model is the checkpoint's; its token ids must be the data's
        _check_same_vocabulary(init.tokenizer, data_config.path, args.init_from)
        _add_pretraining_head(init, train_config.objective, args.init_from)
        model_config = init.model.config
    result = train(model_config if not args.resume else None, train_config, data_config, args.out,
                   resume=args.resume, progress=not args.no_progress,
                   init_model=None if init is None else init.model, lora=lora, base=args.init_from)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return
    summary = f"stopped ({result.stop_reason}) at iter {result.iters} after {result.seconds:.0f}s"
    if result.best_val_loss is not None:
        summary += f"; best eval loss {result.best_val_loss:.4f}"
    print(f"{summary}; checkpoints in {result.run_dir}/best and {result.run_dir}/last")


def _train_args(args: argparse.Namespace) -> list[str]:
    """The `train` command line of `args` without --nproc: what each rank runs."""
    argv = ["train", "--out", args.out]
    for flag, value in (("--data", args.data), ("--preset", args.preset), ("--config", args.config),
                        ("--init-from", args.init_from),
                        *((f"--{name.replace('_', '-')}", getattr(args, name)) for name in LORA_FLAGS)):
        if value is not None:
            argv += [flag, str(value)]
    if args.set:
        argv += ["--set", *args.set]
    argv += ["--resume"] * args.resume + ["--no-progress"] * args.no_progress + ["--lora"] * args.lora
    return argv


def _init_from(args: argparse.Namespace):
    """The checkpoint `--init-from` names: the run's model, architecture and weights; an option
    that would change the model is an error rather than silently ignored."""
    from lmforge.checkpoint import load_checkpoint
    from lmforge.config import load_config_file, parse_overrides
    from lmforge.train import DataConfig, TrainConfig

    ckpt = load_checkpoint(args.init_from)
    sections = {"model": type(ckpt.model.config), "train": TrainConfig, "data": DataConfig}
    model_keys = [f"model.{k}" for k in parse_overrides(args.set or [], sections)["model"]]
    in_file = sorted({"model", "preset"} & set(load_config_file(args.config))) if args.config else []
    if args.preset or model_keys or in_file:
        wrong = ["--preset"] * bool(args.preset) + model_keys + [f"{name} in {args.config}" for name in in_file]
        raise LmforgeError(f"--init-from takes the model from the checkpoint; drop {', '.join(wrong)}")
    return ckpt


def _add_pretraining_head(init, objective: str, checkpoint: str) -> None:
    """A BERT checkpoint without a masked-LM head (a sentence encoder such as all-MiniLM-L6-v2, a
    classifier) gets one to go on pretraining: fresh head weights over its encoder, as HF's
    `BertForMaskedLM.from_pretrained` does for a `BertModel` checkpoint. objective auto means MLM
    there (domain-adaptive pretraining); mlm_nsp adds the NSP head as well."""
    from lmforge.models.bert import Bert
    from lmforge.train.finetune import model_for_task

    if not isinstance(init.model, Bert) or objective not in ("auto", "mlm", "mlm_nsp"):
        return  # other objectives are checked, with their own errors, by `train`
    head = init.model.config.head
    wanted = "pretraining" if objective == "mlm_nsp" else "mlm"
    if head == "pretraining" or (head == "mlm" and wanted == "mlm"):
        return
    init.model, fresh = model_for_task(init.model, wanted, [], keep_pooler=True)
    if os.environ.get("RANK", "0") == "0":
        print(f"{checkpoint} has head {head!r}: added a {'masked-LM + NSP' if wanted == 'pretraining' else 'masked-LM'} "
              f"head for train.objective={objective}; newly initialised: {', '.join(fresh)}")


def _check_same_vocabulary(tokenizer, data_path: str, checkpoint: str) -> None:
    """Training from a checkpoint reads the data's token ids with the checkpoint's embeddings."""
    from lmforge.data import open_data

    data_tokenizer = open_data(data_path).tokenizer
    if tokenizer.backend.get_vocab(with_added_tokens=True) != data_tokenizer.backend.get_vocab(
            with_added_tokens=True):
        raise LmforgeError(
            f"{data_path!r} was prepared with another tokenizer ({data_tokenizer.kind}, "
            f"{data_tokenizer.vocab_size} tokens) than {checkpoint!r} has ({tokenizer.kind}, "
            f"{tokenizer.vocab_size} tokens); training from a checkpoint needs its token ids: use the data "
            f"it was trained on, or data prepared the same way"
        )


# ---- generate --------------------------------------------------------------------------------
def generation_config_from_args(args: argparse.Namespace, max_new_tokens: int):
    from lmforge.generate import GenerationConfig

    early_stopping = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    return GenerationConfig(
        # beam search is a search, not sampling: --num-beams N > 1 implies --greedy
        max_new_tokens=max_new_tokens, do_sample=not args.greedy and args.num_beams == 1,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
        min_new_tokens=args.min_new_tokens, stop=args.stop or [],
        num_return_sequences=args.num_return_sequences, seed=args.seed, num_beams=args.num_beams,
        length_penalty=args.length_penalty, early_stopping=early_stopping,
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from lmforge.checkpoint import load_checkpoint
    from lmforge.generate import SpeculativeStats, generate, inference_dtype
    from lmforge.train.trainer import resolve_device

    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += _read_prompt_file(args.prompt_file)
    if not prompts:
        raise LmforgeError("give at least one --prompt TEXT (or --prompt-file FILE, one prompt a line)")
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, device=device)
    if _is_seq2seq(ckpt.model):  # the prompts are sources to translate
        if args.draft or args.compile or args.dtype != "fp32":
            raise LmforgeError("--draft, --compile and --dtype apply to decoder-only models (GPTs), "
                               f"not to this {type(ckpt.model).__name__}")
        return _print_translations(ckpt, prompts, args)
    draft = _load_draft(args, ckpt, device)
    dtype = inference_dtype(args.dtype, device)
    for model in (ckpt.model, draft):
        if model is not None:
            model.to(dtype)
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:  # 100, or what still fits in the context after the longest prompt
        longest = max(len(ids) for ids in ckpt.tokenizer.encode_batch(prompts))
        context = min(m.config.block_size for m in (ckpt.model, draft) if m is not None)
        max_new_tokens = max(1, min(100, context - longest))
    if draft is not None:  # speculative decoding is greedy, as beam search is
        args.greedy = True
    config = dataclasses.replace(
        generation_config_from_args(args, max_new_tokens),
        num_draft_tokens=args.num_draft_tokens, compile=args.compile,
    )
    stats = SpeculativeStats() if draft is not None else None
    # one sequence streams as it is generated; beam search has no final text until it ends
    stream = (
        not args.json and not args.no_stream and config.num_beams == 1
        and len(prompts) * config.num_return_sequences == 1
    )
    printed_prompt = False

    def on_text(index: int, piece: str) -> None:
        nonlocal printed_prompt
        if not printed_prompt:  # only once generation is under way, so errors come on a clean line
            sys.stdout.write(prompts[0])
            printed_prompt = True
        sys.stdout.write(piece)
        sys.stdout.flush()

    results = generate(ckpt.model, ckpt.tokenizer, prompts, config, on_text=on_text if stream else None,
                       draft_model=draft, speculative_stats=stats)
    if stats is not None:
        print(f"speculative decoding: {stats}", file=sys.stderr)
    if args.json:
        print(json.dumps([
            {"prompt": r.prompt, "text": r.text, "token_ids": r.token_ids, "prompt_ids": r.prompt_ids,
             "finish_reason": r.finish_reason} for r in results
        ], ensure_ascii=False, indent=2))
    elif stream:
        print("" if printed_prompt else results[0].prompt + results[0].text)
    else:
        per_prompt = config.num_return_sequences
        kind = "beam" if config.num_beams > 1 else "sample"  # beams come best first
        for i, r in enumerate(results):
            print(f"--- prompt {i // per_prompt + 1}, {kind} {i % per_prompt + 1} ({r.finish_reason}) ---")
            print(r.prompt + r.text)


def _load_draft(args: argparse.Namespace, ckpt, device):
    """The --draft checkpoint's model, or None; it must read the target's tokens."""
    from lmforge.checkpoint import load_checkpoint
    from lmforge.generate.speculative import check_draft_tokenizer

    if not args.draft:
        return None
    draft = load_checkpoint(args.draft, device=device)
    if _is_seq2seq(draft.model):
        raise LmforgeError(f"the draft {args.draft!r} is an encoder-decoder; speculative decoding needs "
                           "a decoder-only draft (a small GPT trained with the target's tokenizer)")
    check_draft_tokenizer(ckpt.tokenizer, draft.tokenizer)
    return draft.model


def _is_seq2seq(model) -> bool:
    from lmforge.models.encoder_decoder import EncoderDecoder

    return isinstance(model, EncoderDecoder)


def _print_translations(ckpt, sources: list[str], args: argparse.Namespace) -> None:
    from lmforge.generate import translate

    config = generation_config_from_args(args, _seq2seq_max_new_tokens(ckpt.model, args.max_new_tokens))
    results = translate(ckpt.model, ckpt.tokenizer, sources, config, batch_size=args.batch_size,
                        source_tokenizer=ckpt.source_tokenizer)
    if args.json:
        print(json.dumps([
            {"source": r.prompt, "text": r.text, "token_ids": r.token_ids, "source_ids": r.prompt_ids,
             "finish_reason": r.finish_reason} for r in results
        ], ensure_ascii=False, indent=2))
    else:  # one output a line, in input order (num_return_sequences lines per source)
        for r in results:
            print(r.text.replace("\n", " "))


def _seq2seq_max_new_tokens(model, requested: int | None) -> int:
    """What was asked for, else 128, or fewer when the decoder's positions end sooner."""
    if requested is not None:
        return requested
    c = model.config
    return 128 if c.position == "relative" else max(1, min(128, c.max_position - 1))


def cmd_translate(args: argparse.Namespace) -> None:
    from lmforge.checkpoint import load_checkpoint
    from lmforge.train.trainer import resolve_device

    sources = _texts_from_args(args)
    ckpt = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    if not _is_seq2seq(ckpt.model):
        raise LmforgeError(
            f"translate needs an encoder-decoder checkpoint (transformer/t5); {args.checkpoint!r} is a "
            f"{type(ckpt.model).__name__}" + (" (use generate)" if type(ckpt.model).__name__ == "GPT" else "")
        )
    _print_translations(ckpt, sources, args)


def _read_prompt_file(path: str) -> list[str]:
    p = Path(path)
    if path != "-" and not p.is_file():
        raise LmforgeError(f"file {path!r} does not exist")
    text = sys.stdin.read() if path == "-" else p.read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


# ---- eval ------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> None:
    from lmforge.checkpoint import load_checkpoint
    from lmforge.eval import perplexity_of_file
    from lmforge.train.trainer import resolve_device

    ckpt = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    if _is_seq2seq(ckpt.model) or args.source or args.reference:
        return _eval_seq2seq(ckpt, args)
    if args.text is None:
        raise LmforgeError("--text FILE is required (the text whose perplexity to measure)")
    result = perplexity_of_file(ckpt.model, ckpt.tokenizer, args.text, args.context, args.batch_size)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['file']}: loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.3f} "
            f"({result['predicted_tokens']:,} predicted tokens in {result['windows']} windows of {result['context']})"
        )


def _eval_seq2seq(ckpt, args: argparse.Namespace) -> None:
    from lmforge.eval import evaluate_generation

    if not _is_seq2seq(ckpt.model):
        raise LmforgeError("--source/--reference score an encoder-decoder's outputs; this is a "
                           f"{type(ckpt.model).__name__} (use --text FILE for perplexity)")
    if not args.source or not args.reference:
        raise LmforgeError("an encoder-decoder is scored with --source FILE --reference FILE "
                           "(aligned, one sentence a line, gzip ok)")
    from lmforge.data.parallel import read_lines

    sources, references = read_lines(args.source), read_lines(args.reference)
    config = generation_config_from_args(args, _seq2seq_max_new_tokens(ckpt.model, args.max_new_tokens))
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    result = evaluate_generation(ckpt.model, ckpt.tokenizer, sources, references, config,
                                 metrics=metrics, batch_size=args.batch_size,
                                 source_tokenizer=ckpt.source_tokenizer)
    if args.output:
        Path(args.output).write_text("".join(h + "\n" for h in result["hypotheses"]), encoding="utf-8")
    del result["hypotheses"]
    decoding = f"beam {config.num_beams}" if config.num_beams > 1 else "greedy" if not config.do_sample else "sampling"
    result.update(source=args.source, reference=args.reference, decoding=decoding)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        scores = ", ".join(f"{k} {result[k]:.2f}" for k in ("bleu", "chrf", "rouge1", "rouge2", "rougeL") if k in result)
        print(f"{args.source}: {scores} ({result['sentences']} sentences, {decoding}, {result['seconds']:.1f}s)")


# ---- encoders: fill-mask, embed ---------------------------------------------------------------
def _texts_from_args(args: argparse.Namespace) -> list[str]:
    texts = list(args.text or [])
    if args.file:
        texts += _read_prompt_file(args.file)
    if not texts:
        raise LmforgeError("give at least one --text TEXT (or --file FILE, one text a line)")
    return texts


def cmd_fill_mask(args: argparse.Namespace) -> None:
    from lmforge.checkpoint import load_checkpoint
    from lmforge.encoders import fill_mask
    from lmforge.train.trainer import resolve_device

    ckpt = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    results = [fill_mask(ckpt.model, ckpt.tokenizer, text, top_k=args.top_k) for text in args.text]
    if args.json:
        print(json.dumps([{"text": t, "masks": r} for t, r in zip(args.text, results)], ensure_ascii=False, indent=2))
        return
    for text, masks in zip(args.text, results):
        print(text)
        for i, candidates in enumerate(masks):
            label = f"  [MASK] {i + 1}: " if len(masks) > 1 else "  "
            print(label + ", ".join(f"{c['token']} ({c['score']:.3f})" for c in candidates))


def cmd_embed(args: argparse.Namespace) -> None:
    from lmforge.checkpoint import load_checkpoint
    from lmforge.encoders import embed
    from lmforge.train.trainer import resolve_device

    texts = _texts_from_args(args)
    ckpt = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    vectors = embed(ckpt.model, ckpt.tokenizer, texts, normalize=not args.no_normalize,
                    batch_size=args.batch_size)
    if args.json:
        print(json.dumps([{"text": t, "embedding": v} for t, v in zip(texts, vectors.tolist())], ensure_ascii=False))
        return
    for text, vector in zip(texts, vectors.tolist()):
        shown = " ".join(f"{x:+.4f}" for x in vector[:8])
        print(f"{text!r}: [{shown} ...] ({len(vector)} dims)")
    if len(texts) > 1:  # the cosine similarities are what users usually want to see
        sims = vectors @ vectors.T if not args.no_normalize else torch_cosine(vectors)
        print("cosine similarity:")
        for i, row in enumerate(sims.tolist()):
            print(f"  {i + 1}: " + " ".join(f"{x:.3f}" for x in row))


def torch_cosine(vectors):
    import torch.nn.functional as F

    unit = F.normalize(vectors, dim=-1)
    return unit @ unit.T


# ---- finetune, predict -----------------------------------------------------------------------
def cmd_finetune(args: argparse.Namespace) -> None:
    from lmforge.train.distributed import refuse_distributed
    from lmforge.train.finetune import FinetuneConfig, finetune

    if args.task == "multitask" or (
        args.resume and args.task is None and (Path(args.out) / "last" / "multitask.json").is_file()
    ):
        refuse_distributed("lmforge finetune --task multitask")
        return _finetune_multitask(args)
    if args.config is not None:
        raise LmforgeError("--config is for --task multitask (a file of tasks); the other tasks take "
                           "their settings as options")
    if args.task == "seq2seq" or (args.resume and args.task is None and (Path(args.out) / "data").is_dir()):
        return _finetune_seq2seq(args)  # under torchrun too: it trains with `train`
    refuse_distributed(f"lmforge finetune --task {args.task}" if args.task else "lmforge finetune")
    if args.task == "chat":
        return _finetune_chat(args)
    for name in ("train_target", "dev_target", "source_field", "target_field", "label_smoothing"):
        if getattr(args, name) is not None:
            raise LmforgeError(f"--{name.replace('_', '-')} is for --task seq2seq only")
    options = ("task", "text_column", "pair_column", "label_column", "max_length", "epochs", "batch_size", "lr",
               "weight_decay", "warmup_ratio", "grad_clip", "patience", "precision", "seed", "eval_batch_size",
               "device")
    given = [f"--{k.replace('_', '-')}" for k in (*options, *LORA_FLAGS) if getattr(args, k) is not None]
    if args.resume:
        if given or args.no_group_by_length or args.lora:
            raise LmforgeError(f"--resume continues the run with its own settings (LoRA included); drop "
                               f"{', '.join(given + ['--lora'] * args.lora)}")
        result = finetune(args.base, args.train, args.dev, args.out, None, progress=not args.no_progress,
                          resume=True)
    else:
        missing = [f"--{name}" for name in ("base", "train", "dev") if getattr(args, name) is None]
        if missing:
            raise LmforgeError(f"{', '.join(missing)} required (or --resume to continue the run in --out)")
        config = FinetuneConfig(**{k: getattr(args, k) for k in options if getattr(args, k) is not None},
                                group_by_length=not args.no_group_by_length)
        result = finetune(args.base, args.train, args.dev, args.out, config, progress=not args.no_progress,
                          lora=_lora_config(args))
    print(
        f"stopped ({result.stop_reason}) after {result.epochs} epoch(s), {result.steps} steps, {result.seconds:.0f}s; "
        f"best dev {result.metric} {result.best_score:.4f} at epoch {result.best_epoch}; "
        f"checkpoints in {result.out_dir}/best and {result.out_dir}/last"
    )


# --lora-* flags of `lmforge finetune` and the LoraConfig field each sets
LORA_FLAGS = {"lora_rank": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_targets": "target_modules"}


def _lora_config(args: argparse.Namespace, default_targets: tuple[str, ...] | None = None):
    """The LoraConfig of `--lora` and its `--lora-*` flags; None without --lora. Without
    --lora-targets: `default_targets`, else LoraConfig's (c_attn)."""
    from lmforge.train.lora import LoraConfig

    given = {field: getattr(args, flag) for flag, field in LORA_FLAGS.items() if getattr(args, flag) is not None}
    if not args.lora:
        if given:
            raise LmforgeError(f"{', '.join(_lora_flags_given(args))} set LoRA options; add --lora to train with "
                               f"LoRA")
        return None
    if default_targets is not None:
        given.setdefault("target_modules", default_targets)
    return LoraConfig(**given)


def _lora_flags_given(args: argparse.Namespace) -> list[str]:
    return ["--lora"] * args.lora + [f"--{flag.replace('_', '-')}" for flag in LORA_FLAGS
                                     if getattr(args, flag) is not None]


def _finetune_seq2seq(args: argparse.Namespace) -> None:
    from lmforge.train.lora import BLOCK_LINEARS
    from lmforge.train.seq2seq import finetune_seq2seq

    options = ("max_length", "epochs", "batch_size", "lr", "weight_decay", "warmup_ratio", "grad_clip",
               "patience", "precision", "seed", "device", "label_smoothing", "source_field", "target_field",
               "train_target", "dev_target")
    given = {k: getattr(args, k) for k in options if getattr(args, k) is not None}
    if args.resume and (given or _lora_flags_given(args)):
        flags = ", ".join([f"--{k.replace('_', '-')}" for k in given] + _lora_flags_given(args))
        raise LmforgeError(f"--resume continues the run with its own settings (LoRA included); drop {flags}")
    for name in ("text_column", "pair_column", "label_column", "eval_batch_size"):
        if getattr(args, name) is not None:
            raise LmforgeError(f"--{name.replace('_', '-')} does not apply to --task seq2seq")
    result = finetune_seq2seq(args.base, args.train, args.dev, args.out, resume=args.resume,
                              progress=not args.no_progress, lora=_lora_config(args, BLOCK_LINEARS), **given)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return
    best = f"; best dev loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
    print(f"stopped ({result.stop_reason}) at step {result.iters} after {result.seconds:.0f}s{best}; "
          f"checkpoints in {result.run_dir}/best and {result.run_dir}/last")


def _finetune_multitask(args: argparse.Namespace) -> None:
    from lmforge.train.multitask import finetune_multitask, load_multitask_config

    # everything else lives in the config file, so a flag here would silently compete with it
    own = {"command", "func", "task", "config", "out", "resume", "no_progress"}
    wrong = [f"--{k.replace('_', '-')}" for k, v in vars(args).items() if k not in own and v not in (None, False)]
    if wrong:
        raise LmforgeError(f"{', '.join(wrong)} do(es) not apply to --task multitask: set the base, the files "
                           f"and the training options in the --config file")
    if args.resume:
        if args.config is not None:
            raise LmforgeError("--resume continues the run with its own config (RUN_DIR/last/multitask.json); "
                               "drop --config")
        config = None
    elif args.config is None:
        raise LmforgeError("--task multitask needs --config FILE (.toml or .yaml): base, training options and "
                           "a list of tasks (or --resume to continue the run in --out)")
    else:
        config = load_multitask_config(args.config)
    result = finetune_multitask(config, args.out, progress=not args.no_progress, resume=args.resume)
    best = next((r for r in reversed(result.history) if r["step"] == result.best_step), None)
    shown = "" if best is None else " (" + ", ".join(
        f"{name} {t['score']:.4f}" for name, t in best["tasks"].items()) + ")"
    print(f"stopped ({result.stop_reason}) at step {result.steps} after {result.seconds:.0f}s; steps per task: "
          + ", ".join(f"{name} {n}" for name, n in result.task_steps.items())
          + f"; best score {result.best_score:.4f} at step {result.best_step}{shown}; "
          f"checkpoints in {result.out_dir}/best/<task> and {result.out_dir}/last/<task>")


def _finetune_chat(args: argparse.Namespace) -> None:
    from lmforge.train.chat import ChatConfig, finetune_chat
    from lmforge.train.lora import BLOCK_LINEARS

    options = ("max_length", "epochs", "batch_size", "lr", "weight_decay", "warmup_ratio", "grad_clip",
               "precision", "seed", "device")
    wrong = [n for n in ("train_target", "dev_target", "source_field", "target_field", "label_smoothing",
                         "text_column", "pair_column", "label_column", "eval_batch_size", "patience")
             if getattr(args, n) is not None] + (["resume"] if args.resume else [])
    if wrong:
        raise LmforgeError(f"{', '.join('--' + n.replace('_', '-') for n in wrong)} do(es) not apply to --task chat")
    missing = [f"--{name}" for name in ("base", "train") if getattr(args, name) is None]
    if missing:
        raise LmforgeError(f"{', '.join(missing)} required for --task chat")
    config = ChatConfig(**{k: getattr(args, k) for k in options if getattr(args, k) is not None})
    result = finetune_chat(args.base, args.train, args.out, args.dev, config, progress=not args.no_progress,
                           lora=_lora_config(args, BLOCK_LINEARS))
    best = f"; best dev loss {result.best_dev_loss:.4f}" if result.best_dev_loss is not None else ""
    print(f"stopped ({result.stop_reason}) after {result.epochs} epoch(s), {result.steps} steps, "
          f"{result.conversations} conversations ({result.dropped} dropped: too long){best}; "
          f"checkpoints in {result.out_dir}")


# ---- chat ------------------------------------------------------------------------------------
def cmd_chat(args: argparse.Namespace) -> None:
    from lmforge.chat import ChatTemplate, chat_loop
    from lmforge.checkpoint import load_checkpoint
    from lmforge.generate import generate
    from lmforge.train.trainer import resolve_device

    ckpt = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    if _is_seq2seq(ckpt.model) or not hasattr(ckpt.model.config, "block_size"):
        raise LmforgeError(f"lmforge chat needs a GPT checkpoint; {args.checkpoint!r} holds a "
                           f"{type(ckpt.model).__name__}")
    template = ChatTemplate.for_checkpoint(ckpt)
    base = generation_config_from_args(args, args.max_new_tokens)
    if base.num_return_sequences != 1 or base.num_beams != 1:
        raise LmforgeError("lmforge chat streams one reply: drop --num-return-sequences / --num-beams")
    config = dataclasses.replace(base, stop=base.stop + [s for s in template.stop if s not in base.stop])
    block_size = ckpt.model.config.block_size

    def reply(history, emit):
        prompt = template.render(history)
        n_prompt = len(ckpt.tokenizer.encode(prompt))
        if n_prompt >= block_size:
            raise LmforgeError(f"the conversation is {n_prompt} tokens, the model's context {block_size}; "
                               "type /reset to start over")
        turn = dataclasses.replace(config, max_new_tokens=min(config.max_new_tokens, block_size - n_prompt))
        (result,) = generate(ckpt.model, ckpt.tokenizer, prompt, turn, on_text=lambda _, piece: emit(piece))
        return result.text

    interactive = sys.stdin.isatty()
    if interactive:
        print("chatting (/reset clears the history, /exit or Ctrl-D ends)", file=sys.stderr)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def lines():
        while True:
            if interactive:
                write("user: ")
            line = sys.stdin.readline()
            if not line:
                return
            yield line

    chat_loop(reply, lines(), write, system=args.system)


# ---- distill ---------------------------------------------------------------------------------
# flags of `lmforge distill` and the config key each sets: language-model teachers train with the
# pretraining loop, fine-tuned classifiers with the fine-tuning loop
DISTILL_LM_FLAGS = {"iters": "train.max_iters", "batch_size": "train.batch_size", "lr": "train.lr",
                    "eval_interval": "train.eval_interval", "precision": "train.precision",
                    "device": "train.device", "seed": "train.seed", "max_length": "data.max_length"}
DISTILL_TASK_FLAGS = {name: f"finetune.{name}" for name in (
    "epochs", "batch_size", "lr", "max_length", "precision", "device", "seed", "text_column",
    "pair_column", "label_column")}


def cmd_distill(args: argparse.Namespace) -> None:
    from lmforge.checkpoint import read_meta
    from lmforge.compress.distill import TASK_HEADS, DistillConfig, distill
    from lmforge.config import from_dict, parse_overrides
    from lmforge.train import DataConfig, TrainConfig
    from lmforge.train.finetune import FinetuneConfig

    settings = {"student": args.student, "alpha": args.alpha, "temperature": args.temperature,
                "hidden_weight": args.hidden_weight, "hidden_loss": args.hidden_loss}
    saved = None
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k, v in settings.items() if v is not None]
        if given or args.init_from_teacher:
            given += ["--init-from-teacher"] if args.init_from_teacher else []
            raise LmforgeError(f"--resume continues the run with its own student and settings; drop {', '.join(given)}")
        if not (Path(args.out) / "last" / "config.json").is_file():
            raise LmforgeError(f"cannot resume: no checkpoint at {str(Path(args.out) / 'last')!r}")
        saved = read_meta(Path(args.out) / "last")
        if "distill" not in saved:
            raise LmforgeError(f"cannot resume: {args.out!r} is not a distillation run")
    on_task = saved["distill"]["task"] in TASK_HEADS if saved else bool(args.train or args.dev)
    flags = DISTILL_TASK_FLAGS if on_task else DISTILL_LM_FLAGS
    wrong = [f"--{k.replace('_', '-')}" for k in {*DISTILL_LM_FLAGS, *DISTILL_TASK_FLAGS} - set(flags)
             if getattr(args, k) is not None]
    if wrong or (not on_task and (args.train or args.dev)) or (on_task and args.data):
        raise LmforgeError(
            "a fine-tuned classifier teacher distils on --train/--dev files with --epochs, "
            "--text-column, ...; a language-model teacher on --data DATA_DIR with --iters"
            + (f" (drop {', '.join(sorted(wrong))})" if wrong else "")
        )
    sections = {"finetune": FinetuneConfig} if on_task else {"train": TrainConfig, "data": DataConfig}
    raw = {name: dict((saved or {}).get(name, {})) for name in sections}
    for flag, key in flags.items():
        if getattr(args, flag) is not None:
            section, name = key.split(".")
            raw[section][name] = getattr(args, flag)
    for name, values in parse_overrides(args.set or [], sections).items():
        raw[name].update(values)
    if on_task:
        if args.resume and (args.set or any(getattr(args, k) is not None for k in flags)):
            raise LmforgeError("--resume continues a classifier's distillation with its own settings; "
                               "drop the options")
        config = None if args.resume else from_dict(FinetuneConfig, raw["finetune"], "finetune")
        run = dict(train_file=args.train, dev_file=args.dev, finetune_config=config)
    else:
        if args.data:
            raw["data"]["path"] = args.data
        if not raw["data"].get("path"):
            raise LmforgeError("--data DATA_DIR is required for a language-model teacher "
                               "(--train/--dev files for a fine-tuned classifier)")
        run = dict(data=from_dict(DataConfig, raw["data"], "data"),
                   train_config=from_dict(TrainConfig, raw["train"], "train"))
    config = None
    if not args.resume:
        config = DistillConfig(**{k: v for k, v in settings.items() if k != "student" and v is not None},
                               init_from_teacher=args.init_from_teacher)
    result = distill(args.teacher, None if args.resume else args.student, args.out, config=config,
                     resume=args.resume, progress=not args.no_progress, **run)
    t, s, r = result.teacher_params, result.student_params, result.training
    steps = getattr(r, "iters", None) or getattr(r, "steps", 0)
    print(f"distilled a {t / 1e6:.2f}M-parameter teacher into a {s / 1e6:.2f}M-parameter student "
          f"({s / t:.0%} of its size): stopped ({r.stop_reason}) after {steps} steps, {r.seconds:.0f}s")
    split = "dev" if on_task else "eval batches"
    for who, scores in (("teacher", result.teacher_scores), ("student", result.student_scores)):
        print(f"{who} ({split}): " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    print(f"checkpoints (the student) in {result.run_dir}/best and {result.run_dir}/last")


def cmd_predict(args: argparse.Namespace) -> None:
    from lmforge.checkpoint import load_checkpoint
    from lmforge.predict import predict
    from lmforge.train.trainer import resolve_device

    texts = _texts_from_args(args)
    if args.pair is not None and len(args.pair) != len(texts):
        raise LmforgeError(f"got {len(texts)} texts but {len(args.pair)} --pair; give one --pair per text")
    ckpt = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    results = predict(ckpt.model, ckpt.tokenizer, texts, pairs=args.pair, batch_size=args.batch_size,
                      max_length=args.max_length)
    if args.json:
        print(json.dumps([{"text": t, **r} for t, r in zip(texts, results)], ensure_ascii=False, indent=2))
        return
    for text, r in zip(texts, results):
        if "label" in r:
            print(f"{r['label']}\t{r['score']:.3f}\t{text}")
        else:
            shown = ", ".join(f"{e['text']} ({e['entity']}, {e['score']:.2f})" for e in r["entities"])
            print(f"{text}\n  entities: {shown or 'none'}\n  tags: {' '.join(r['tags'])}")


# ---- prune -----------------------------------------------------------------------------------
def cmd_prune(args: argparse.Namespace) -> None:
    from lmforge.compress.prune import prune_checkpoint, report_lines
    from lmforge.config import from_dict, parse_overrides
    from lmforge.train import DataConfig, TrainConfig

    recover = args.recover_iters > 0
    if args.recover_iters < 0:
        raise LmforgeError(f"--recover-iters must be >= 0, got {args.recover_iters}")
    if recover and args.data is None:
        raise LmforgeError("--recover-iters needs --recover-data DATA_DIR (a folder made by `lmforge prepare`)")
    if args.data is None and args.set:
        raise LmforgeError("--set configures scoring, evaluation and recovery on data; pass --recover-data DATA_DIR")
    # recovery continues a trained model: a lower peak lr and a short warmup by default
    raw = {"train": {"lr": args.recover_lr, "max_iters": max(1, args.recover_iters),
                     "warmup_iters": args.recover_iters // 10, "device": args.device}, "data": {}}
    if args.data is not None:
        raw["data"]["path"] = args.data
        for name, values in parse_overrides(args.set or [], {"train": TrainConfig, "data": DataConfig}).items():
            raw[name].update(values)
    train_config = from_dict(TrainConfig, raw["train"], "train")
    data = from_dict(DataConfig, raw["data"], "data") if args.data is not None else None
    report = prune_checkpoint(args.checkpoint, args.out, args.method, args.amount, scope=args.scope, data=data,
                              train_config=train_config, recover=recover, score_batches=args.score_batches,
                              progress=not args.no_progress)
    print("\n".join(report_lines(report)))


# ---- quantize --------------------------------------------------------------------------------
def cmd_quantize(args: argparse.Namespace) -> None:
    from lmforge.compress.quantize import quantize_checkpoint

    summary = quantize_checkpoint(args.checkpoint, args.out, args.scheme, args.group_size,
                                  include_head=args.include_head)
    print(summary)
    print(f"wrote {args.out}")


# ---- lora ------------------------------------------------------------------------------------
def cmd_lora_merge(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from lmforge.checkpoint import save_checkpoint
    from lmforge.train.lora import (
        load_adapted_checkpoint,
        lora_config_of,
        lora_state_dict,
        merge_lora,
    )

    ckpt = load_adapted_checkpoint(args.base, args.adapter)
    config, trained = lora_config_of(ckpt.model), sum(t.numel() for t in lora_state_dict(ckpt.model).values())
    merge_lora(ckpt.model)
    extra = {"lora_merged": {"base": str(args.base), "adapter": str(args.adapter), "lora": asdict(config)}}
    save_checkpoint(args.out, ckpt.model, ckpt.tokenizer, extra=extra, source_tokenizer=ckpt.source_tokenizer)
    print(f"merged {trained:,} adapter parameters (rank {config.rank}, {', '.join(config.target_modules)}) "
          f"into {args.base}; wrote {args.out}")


# ---- convert ---------------------------------------------------------------------------------
# ---- serve -----------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from lmforge.serve.app import create_app
        from lmforge.serve.protocol import ServerLimits
        from lmforge.serve.security import ApiKeys
    except ImportError as e:
        raise LmforgeError(f"serving needs the serve extra: pip install 'lmforge[serve]' ({e.name} is missing)") from e
    from lmforge.checkpoint import load_checkpoint
    from lmforge.train.trainer import resolve_device

    keys = ApiKeys.from_sources(args.api_key)
    if not keys.enabled and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it",
              file=sys.stderr)
    ckpt = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    limits = ServerLimits(max_n=args.max_n, max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes)
    app = create_app(
        ckpt, model_name=args.model_name, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
        request_timeout=args.request_timeout, limits=limits, api_keys=keys,
        requests_per_minute=args.rate_limit, public_metrics=args.public_metrics,
    )
    routes = "chat page at /, OpenAI API at /v1" if app.state.engine is not None else "API at /v1"
    print(f"serving {app.state.model_name!r} on http://{args.host}:{args.port} ({routes})"
          + ("; API key required" if keys.enabled else ""))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def cmd_convert(args: argparse.Namespace) -> None:
    from lmforge.interop import convert

    print(convert(args.src, args.dst))


# ---- quickstart ------------------------------------------------------------------------------
QUICKSTART_PROMPTS = ["The with statement", "A class definition"]


def cmd_quickstart(args: argparse.Namespace) -> None:
    """The README's first command: prepare the built-in corpus, train for a few minutes, sample."""
    from lmforge.checkpoint import load_checkpoint
    from lmforge.data import PrepareConfig, TokenData, prepare
    from lmforge.generate import GenerationConfig, generate
    from lmforge.models.gpt import GPT_PRESETS, GPTConfig
    from lmforge.train import DataConfig, TrainConfig, train

    out = Path(args.out)
    data_dir, run_dir = out / "data", out / "run"
    if (data_dir / "manifest.json").is_file():  # a rerun keeps the data (and so the tokenizer) it trained on
        print(f"1/3 using the corpus already prepared in {data_dir}")
    else:
        print(f"1/3 preparing the built-in corpus (Python reference docs) -> {data_dir}")
        prepare(PrepareConfig(source="builtin:pydocs", tokenizer="bpe", vocab_size=2048), data_dir)
    data = TokenData.open(data_dir)
    print(f"2/3 training a small GPT for up to {args.minutes:g} minutes -> {run_dir}")
    model_config = GPTConfig(**{**GPT_PRESETS["gpt-tiny"], "block_size": 128, "dropout": 0.1,
                                "vocab_size": data.vocab_size})
    train_config = TrainConfig(
        batch_size=16, max_iters=args.iters, max_time=args.minutes * 60, lr=2e-3, warmup_iters=50,
        eval_interval=100, eval_iters=10, patience=3,
    )
    resume = (run_dir / "last").exists()
    if resume:
        print(f"   (continuing the run already in {run_dir})")
    train(None if resume else model_config, train_config, DataConfig(path=str(data_dir)), run_dir, resume=resume)
    print("3/3 sampling from the best checkpoint")
    ckpt = load_checkpoint(run_dir)
    config = GenerationConfig(max_new_tokens=60, temperature=0.8, top_k=50, seed=0)
    for r in generate(ckpt.model, ckpt.tokenizer, QUICKSTART_PROMPTS, config):
        print(f"--- {r.prompt!r} ---\n{r.prompt}{r.text}\n")
    print(f"next: lmforge generate {run_dir} --prompt 'Your prompt' --max-new-tokens 100")


# ---- parser ----------------------------------------------------------------------------------
def _add_generation_options(p: argparse.ArgumentParser, greedy_default: bool = False) -> None:
    g = p.add_argument_group("decoding (Hugging Face generate's names)")
    if greedy_default:  # translation and scoring: greedy unless asked to sample
        g.add_argument("--sample", dest="greedy", action="store_false", help="sample instead of greedy")
    else:
        g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--no-repeat-ngram-size", type=int, default=0)
    g.add_argument("--min-new-tokens", type=int, default=0, help="forbid end-of-text before N new tokens")
    g.add_argument("--num-beams", type=int, default=1,
                   help="beam search with N beams (deterministic; the sampling options do not apply)")
    g.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = log-prob sum / length**X: > 0 favours longer texts, < 0 shorter")
    g.add_argument("--early-stopping", type=str.lower, choices=["true", "false", "never"], default="false",
                   help="when beam search stops (Hugging Face's early_stopping; default: false)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--num-return-sequences", type=int, default=1)
    g.add_argument("--seed", type=int, default=None)


def _add_lora_options(p: argparse.ArgumentParser, what: str, targets: str) -> None:
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora", action="store_true", help=f"LoRA: {what}")
    g.add_argument("--lora-rank", type=int, help="rank r of the adapters (default: 8)")
    g.add_argument("--lora-alpha", type=float, help="the update is scaled by alpha / r (default: 16)")
    g.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (default: 0)")
    g.add_argument("--lora-targets", help=f"comma-separated Linear layers to adapt, names or suffixes ({targets})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Train, evaluate and sample Transformer LMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("quickstart", help="prepare the built-in corpus, train a small GPT, generate")
    p.add_argument("--out", default="runs/quickstart", help="folder for data and run (default: runs/quickstart)")
    p.add_argument("--minutes", type=float, default=3.0, help="training time budget (default: 3)")
    p.add_argument("--iters", type=int, default=1000, help="at most this many steps (default: 1000)")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("prepare", help="clean text, train a tokenizer, write token shards")
    p.add_argument("--data", required=True, help="text file, folder, glob, JSONL file, or builtin:pydocs")
    p.add_argument("--tokenizer", default=None,
                   help="bpe (byte-level BPE, for GPTs), wordpiece (BERT; keeps sentence and document "
                        "boundaries for NSP) or char (default: bpe)")
    p.add_argument("--tokenizer-from", metavar="CKPT",
                   help="use this checkpoint's tokenizer (lmforge checkpoint or run folder, or Hugging Face "
                        "folder) instead of training one: data that `lmforge train --init-from CKPT` can "
                        "continue training the checkpoint on")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="BPE/WordPiece vocabulary size (default: 8192)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="last fraction of tokens for validation")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--sentinels", type=int, default=None,
                   help="add N T5 sentinel tokens <extra_id_i> (and <pad> </s> <unk>) for span corruption")
    g = p.add_argument_group("parallel text (sequence to sequence)")
    g.add_argument("--target", help="target side: a file aligned line by line with --data (gzip ok)")
    g.add_argument("--source-field", help="--data is a TSV/CSV/JSONL of pairs: the source column")
    g.add_argument("--target-field", help="... and the target column")
    g.add_argument("--val-data", help="validation source file (or pairs file); default: the last --val-fraction")
    g.add_argument("--val-target", help="validation target file aligned with --val-data")
    g.add_argument("--separate-tokenizers", action="store_true",
                   help="one BPE vocabulary per side (each --vocab-size) instead of one joint vocabulary")
    g.add_argument("--max-length", type=int, default=256,
                   help="drop pairs with a side longer than this many tokens (default: 256)")
    p.add_argument("--out", required=True, help="output DATA_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="pretrain a model on a prepared DATA_DIR")
    p.add_argument("--data", help="DATA_DIR written by `lmforge prepare`")
    p.add_argument("--out", required=True, help="RUN_DIR for checkpoints, metrics.jsonl and loss.png")
    p.add_argument("--preset", help="model preset: gpt-tiny (default), gpt-mini, gpt-small, ..., or "
                                    "bert-mini, bert-small (MLM + NSP pretraining on wordpiece data)")
    p.add_argument("--config", help="TOML/YAML/JSON file with [model], [train], [data] sections")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", action="extend",
                   help="override config values, e.g. --set train.lr=3e-4 model.n_layer=6")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="data-parallel (DDP) training on N processes of this machine: a shortcut for "
                        "`torchrun --standalone --nproc-per-node N -m lmforge train ...`")
    p.add_argument("--init-from", metavar="CKPT",
                   help="start from this checkpoint's weights and model config (lmforge checkpoint or run "
                        "folder, or Hugging Face folder); DATA_DIR must use its tokenizer")
    _add_lora_options(p, "with --init-from: train low-rank adapters over its frozen weights; best/ and last/ "
                         "are written merged, RUN_DIR/adapter/ holds the best adapter alone",
                      "default: c_attn,c_proj,c_fc")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("checkpoint", help="checkpoint folder, run folder, or Hugging Face GPT-2 folder")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-file", help="file with one prompt a line ('-' for stdin)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate (default: 100, or what fits in the model's context)")
    _add_generation_options(p)
    p.add_argument("--json", action="store_true", help="print results (text and token ids) as JSON")
    p.add_argument("--no-stream", action="store_true", help="print when done instead of streaming")
    p.add_argument("--batch-size", type=int, default=32, help="encoder-decoders: sources per batch")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    g = p.add_argument_group("faster decoding")
    g.add_argument("--draft", metavar="DRAFT_CKPT",
                   help="speculative decoding with this small GPT (same tokenizer) proposing tokens; "
                        "implies --greedy, and the output is the target's greedy output")
    g.add_argument("--num-draft-tokens", type=int, default=4,
                   help="tokens the draft proposes per target pass (default: 4)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token decode step; with --draft, the draft's step "
                        "(pays off on few machines; see README)")
    g.add_argument("--dtype", choices=("fp32", "bf16", "auto"), default="fp32",
                   help="weights' dtype for decoding; auto: bf16 on a GPU or a CPU with native bf16 "
                        "(default: fp32)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("translate", help="translate / summarise with an encoder-decoder checkpoint")
    p.add_argument("checkpoint", help="encoder-decoder checkpoint, run folder, or Hugging Face T5 folder")
    p.add_argument("--text", action="append", help="source text (repeatable)")
    p.add_argument("--file", help="file with one source a line ('-' for stdin)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 128")
    _add_generation_options(p, greedy_default=True)
    p.add_argument("--batch-size", type=int, default=32, help="sources per batch")
    p.add_argument("--json", action="store_true", help="print results (text and token ids) as JSON")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("eval", help="perplexity of a text file; BLEU/chrF/ROUGE of an encoder-decoder")
    p.add_argument("checkpoint")
    p.add_argument("--text", help="UTF-8 text file (language models: loss and perplexity)")
    p.add_argument("--source", help="encoder-decoders: source file, one sentence a line (gzip ok)")
    p.add_argument("--reference", help="encoder-decoders: reference file aligned with --source")
    p.add_argument("--metrics", default="bleu,chrf,rouge", help="comma-separated: bleu, chrf, rouge")
    p.add_argument("--output", help="encoder-decoders: write the outputs here, one a line")
    p.add_argument("--max-new-tokens", type=int, default=None, help="encoder-decoders: default 128")
    _add_generation_options(p, greedy_default=True)
    p.add_argument("--context", type=int, default=None, help="window length in tokens (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("fill-mask", help="predict the [MASK] tokens of a text with an MLM checkpoint")
    p.add_argument("checkpoint", help="lmforge or Hugging Face BERT checkpoint with a masked-LM head")
    p.add_argument("text", nargs="+", help='text with one or more [MASK] tokens, e.g. "Paris is the [MASK] of France."')
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_fill_mask)

    p = sub.add_parser("embed", help="sentence embeddings from an encoder checkpoint (mean pooling)")
    p.add_argument("checkpoint", help="lmforge or Hugging Face BERT checkpoint (e.g. all-MiniLM-L6-v2)")
    p.add_argument("--text", action="append", help="text to embed (repeatable)")
    p.add_argument("--file", help="file with one text a line ('-' for stdin)")
    p.add_argument("--no-normalize", action="store_true", help="keep the raw mean-pooled vectors")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the vectors as JSON")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("finetune", help="fine-tune BERT (classification, NER) or an encoder-decoder (seq2seq)")
    p.add_argument("--base", help="lmforge or Hugging Face BERT checkpoint (any head) to start from")
    p.add_argument("--train", help="training file: .tsv/.csv/.jsonl (classification) or CoNLL")
    p.add_argument("--dev", help="dev file, scored after every epoch (same format)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from last/ (same settings and files)")
    p.add_argument("--out", required=True, help="RUN_DIR for best/, last/ and metrics.jsonl")
    p.add_argument("--task", choices=("classification", "token-classification", "seq2seq", "chat", "multitask"),
                   default=None,
                   help="classification (default), token-classification (CoNLL files, e.g. NER), "
                        "seq2seq (an encoder-decoder base on sentence pairs), chat (a GPT base on "
                        "conversations: JSONL {\"messages\": [...]}) or multitask (several BERT tasks over "
                        "one encoder, set up in --config)")
    p.add_argument("--config", help="--task multitask only: TOML/YAML file with base, steps, sampling, ... and a "
                                    "list of tasks (name, type, train_file, dev_file, weight)")
    p.add_argument("--train-target", help="seq2seq: target file aligned with --train (else --train is a "
                                          "TSV/CSV/JSONL of pairs)")
    p.add_argument("--dev-target", help="seq2seq: target file aligned with --dev")
    p.add_argument("--source-field", help="seq2seq pairs files: the source column (default: source)")
    p.add_argument("--target-field", help="seq2seq pairs files: the target column (default: target)")
    p.add_argument("--label-smoothing", type=float, help="seq2seq: default 0.1")
    p.add_argument("--text-column", help="text column (default: text, sentence, content, sentence1 or question)")
    p.add_argument("--pair-column", help="second text of a pair (default: text_pair or sentence2, if present)")
    p.add_argument("--label-column", help="label column (default: label)")
    p.add_argument("--max-length", type=int, help="tokens per example, special tokens included (default: 128)")
    p.add_argument("--epochs", type=int, help="default: 3")
    p.add_argument("--batch-size", type=int, help="default: 32")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 5e-5)")
    p.add_argument("--weight-decay", type=float, help="default: 0.01")
    p.add_argument("--warmup-ratio", type=float, help="fraction of steps warming up, then linear decay (default: 0.1)")
    p.add_argument("--grad-clip", type=float, help="gradient norm clip, 0 = off (default: 1.0)")
    p.add_argument("--patience", type=int, help="stop after N epochs without a better dev score (default: 0 = off)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None, help="default: auto")
    p.add_argument("--seed", type=int, help="default: 1337")
    p.add_argument("--eval-batch-size", type=int, help="default: 64")
    p.add_argument("--no-group-by-length", action="store_true",
                   help="plain shuffled batches (default: batches of similar lengths, less padding)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_lora_options(p, "train low-rank adapters over the frozen base (and a BERT task's head in full); "
                         "best/ and last/ are written merged, RUN_DIR/adapter/ holds the best adapter alone; "
                         "chat: the base may be int8/int4-quantized (QLoRA)",
                      "default: c_attn for BERT tasks, c_attn,c_proj,c_fc for chat and seq2seq")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("distill", help="distil a GPT or BERT teacher into a smaller student")
    p.add_argument("--teacher", help="teacher checkpoint or run folder (GPT, BERT with an MLM head, or "
                                     "a classifier from `lmforge finetune`); default on --resume: the run's")
    p.add_argument("--student", help="preset (gpt-tiny, bert-mini, ...; vocabulary and context from the "
                                     "teacher) or checkpoint sharing the teacher's tokenizer")
    p.add_argument("--init-from-teacher", action="store_true",
                   help="student = the teacher with every other layer (DistilBERT's initialisation)")
    p.add_argument("--out", required=True, help="RUN_DIR for the student's best/, last/ and metrics.jsonl")
    p.add_argument("--data", help="language-model teachers: DATA_DIR prepared with the teacher's tokenizer")
    p.add_argument("--train", help="classifier teachers: training file (as for finetune)")
    p.add_argument("--dev", help="classifier teachers: dev file, scored after every epoch")
    p.add_argument("--text-column", help="classification text column (default: text, sentence, ...)")
    p.add_argument("--pair-column", help="second text of a pair")
    p.add_argument("--label-column", help="label column (default: label)")
    p.add_argument("--alpha", type=float, help="weight of the teacher's soft targets, 1 - alpha on the "
                                               "labels (default: 0.5)")
    p.add_argument("--temperature", type=float, help="softmax temperature T; KL scaled by T^2 (default: 2)")
    p.add_argument("--hidden-weight", type=float,
                   help="weight of matching the final hidden states (equal widths; default: 0 = off)")
    p.add_argument("--hidden-loss", choices=("cosine", "mse"), help="default: cosine (DistilBERT)")
    p.add_argument("--iters", type=int, help="language models: optimizer steps (train.max_iters)")
    p.add_argument("--epochs", type=int, help="classifiers: epochs (default: 3)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--eval-interval", type=int, help="language models: steps between evaluations")
    p.add_argument("--max-length", type=int, help="BERT: tokens per example")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None)
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", action="extend",
                   help="other train./data. (language models) or finetune. (classifiers) settings")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (its teacher and settings)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("chat", help="chat with a GPT checkpoint in the terminal (reads stdin)")
    p.add_argument("checkpoint", help="checkpoint or run folder (e.g. from finetune --task chat)")
    p.add_argument("--system", help="system message that starts every conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="per reply (default: 256, or what fits)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    _add_generation_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching) and chat page")
    p.add_argument("checkpoint", help="GPT (generation), BERT (embeddings, classify, fill-mask) or "
                                      "encoder-decoder (completions = translation) checkpoint or HF folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append",
                   help="require Authorization: Bearer KEY on /v1 and /metrics (repeatable; or LMFORGE_API_KEY)")
    p.add_argument("--rate-limit", type=float, default=None, help="requests per minute per API key")
    p.add_argument("--public-metrics", action="store_true", help="serve /metrics without the API key")
    p.add_argument("--model-name", default=None, help="the model id clients pass (default: the folder's name)")
    p.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together (default: 16)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default: 64)")
    p.add_argument("--max-tokens", type=int, default=512, help="cap on a request's max_tokens (default: 512)")
    p.add_argument("--max-n", type=int, default=8, help="cap on a request's n (default: 8)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body cap (default: 1 MiB)")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds before a request is ended")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("predict", help="labels (classification) or entities (NER) from a fine-tuned checkpoint")
    p.add_argument("checkpoint", help="checkpoint or run folder written by `lmforge finetune` (or an HF one)")
    p.add_argument("--text", action="append", help="text to label (repeatable)")
    p.add_argument("--file", help="file with one text a line ('-' for stdin)")
    p.add_argument("--pair", action="append", help="second text of a pair, one per --text (classification)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's positions)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("prune", help="prune a checkpoint: weights (magnitude), attention heads or MLP neurons")
    p.add_argument("checkpoint", help="lmforge checkpoint or run folder (GPT, BERT or encoder-decoder)")
    p.add_argument("--method", required=True, choices=("magnitude", "heads", "ffn"),
                   help="magnitude: zero the smallest weights (sparse file); heads / ffn: remove attention "
                        "heads / MLP neurons (a smaller, faster model)")
    p.add_argument("--amount", type=float, required=True, help="fraction to remove, in [0, 1) (e.g. 0.3)")
    p.add_argument("--scope", choices=("layer", "global"), default="layer",
                   help="magnitude: the amount of each matrix (default) or of all block matrices pooled")
    p.add_argument("--out", required=True, help="output checkpoint folder (a run folder with best/ and last/ "
                                                "after recovery)")
    p.add_argument("--recover-data", "--score-data", dest="data", metavar="DATA_DIR",
                   help="prepared data: gradient importance scores for heads/ffn, val losses, and recovery")
    p.add_argument("--recover-iters", type=int, default=0,
                   help="fine-tune the pruned model this many steps on DATA_DIR (default: 0, none)")
    p.add_argument("--recover-lr", type=float, default=3e-4, help="recovery peak learning rate (default: 3e-4)")
    p.add_argument("--score-batches", type=int, default=8, help="training batches for gradient scores (default: 8)")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", action="extend",
                   help="train/data settings of scoring, evaluation and recovery, e.g. train.batch_size=8")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("quantize", help="int8 / int4 weights (and int8 activations) for a smaller model")
    p.add_argument("checkpoint", help="float lmforge checkpoint, run folder or Hugging Face folder")
    p.add_argument("--scheme", required=True, metavar="SCHEME",
                   help="int8-weight (int8 weights, float activations), int8-dynamic (int8 weights and "
                        "per-token int8 activations) or int4-weight (int4 weights in groups)")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4-weight: input channels per scale and zero point, 32, 64, 128 or 256 (default: 128)")
    p.add_argument("--include-head", action="store_true",
                   help="also quantize Linear layers outside the blocks (an untied lm_head, BERT's heads)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("lora", help="LoRA adapters: merge one into its base")
    lora_sub = p.add_subparsers(dest="lora_command", required=True)
    p = lora_sub.add_parser("merge", help="write BASE with ADAPTER folded in as an ordinary checkpoint")
    p.add_argument("base", help="the base checkpoint the adapter was trained on (lmforge, run folder or HF)")
    p.add_argument("adapter", help="adapter folder (adapter.safetensors + adapter_config.json), e.g. RUN_DIR/adapter")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.set_defaults(func=cmd_lora_merge)

    p = sub.add_parser("convert", help="convert between lmforge and Hugging Face checkpoints")
    p.add_argument("src", help="lmforge checkpoint/run folder, or Hugging Face folder")
    p.add_argument("dst", help="output folder (the other format)")
    p.set_defaults(func=cmd_convert)
    return parser


# the commands that run distributed under torchrun (WORLD_SIZE > 1); the others would run as N
# copies writing the same files, and refuse (`finetune` decides by its task)
DISTRIBUTED_COMMANDS = ("train", "finetune")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command not in DISTRIBUTED_COMMANDS:
            from lmforge.train.distributed import refuse_distributed

            refuse_distributed(f"lmforge {args.command}")
        args.func(args)
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nlmforge: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Multi-task fine-tuning: one tiny BERT encoder, a classification, an NER and an MLM head."""

import json
import math

import pytest
import torch
from torch import nn

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.encoders import fill_mask
from lmforge.errors import LmforgeError
from lmforge.models.bert import Bert, BertConfig
from lmforge.predict import predict
from lmforge.tokenizer import train_tokenizer
from lmforge.train.finetune import collate, task_loss
from lmforge.train.multitask import (
    MultitaskConfig,
    Task,
    TaskSampler,
    TaskSpec,
    finetune_multitask,
    load_multitask_config,
    read_task,
    task_models,
    task_probabilities,
    weighted_loss,
)
from tests.train.test_finetune import (
    NAMES,
    PLACES,
    _sentences,
    _StopAfter,
    _tagged,
    write_conll,
    write_tsv,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("multitask")
    texts = [t for _, t in _sentences(50, 0)] + [" ".join(NAMES + PLACES + ["good", "bad"])]
    tokenizer = train_tokenizer("wordpiece", texts, vocab_size=120)
    torch.manual_seed(0)
    base = Bert(
        BertConfig(
            n_layer=2, n_head=2, n_embd=32, max_position=64, vocab_size=tokenizer.vocab_size,
            head="mlm",
        )
    )  # fmt: skip
    save_checkpoint(root / "base", base, tokenizer)
    (root / "train.txt").write_text("\n".join(t for _, t in _sentences(40, 5)) + "\n\n")
    (root / "dev.txt").write_text("\n".join(t for _, t in _sentences(12, 6)))
    return {
        "root": root,
        "base": root / "base",
        "tokenizer": tokenizer,
        "train_tsv": write_tsv(root / "train.tsv", _sentences(64, 1)),
        "dev_tsv": write_tsv(root / "dev.tsv", _sentences(16, 2)),
        "train_conll": write_conll(root / "train.conll", _tagged(48, 3)),
        "dev_conll": write_conll(root / "dev.conll", _tagged(16, 4)),
        "train_txt": root / "train.txt",
        "dev_txt": root / "dev.txt",
    }


def task_dicts(files, mlm=True, **weights):
    tasks = [
        dict(name="cls", type="classification", train_file=str(files["train_tsv"]),
             dev_file=str(files["dev_tsv"])),
        dict(name="ner", type="token-classification", train_file=str(files["train_conll"]),
             dev_file=str(files["dev_conll"])),
        dict(name="mlm", type="mlm", train_file=str(files["train_txt"]),
             dev_file=str(files["dev_txt"]), weight=0.5),
    ][: 3 if mlm else 2]  # fmt: skip
    for task in tasks:
        if task["name"] in weights:
            task["weight"] = weights[task["name"]]
    return tasks


def config(files, mlm=True, weights=None, **overrides) -> MultitaskConfig:
    settings = dict(
        base=str(files["base"]), tasks=task_dicts(files, mlm, **(weights or {})), steps=24,
        eval_every=8, batch_size=8, eval_batch_size=16, lr=2e-3, precision="fp32", device="cpu",
        sampling="temperature",
    )  # fmt: skip
    return MultitaskConfig(**{**settings, **overrides})


# --- sampling ----------------------------------------------------------------------------------
def test_task_probabilities_are_exact():
    sizes = [100, 400, 900]
    assert task_probabilities(sizes, [1, 1, 1], "proportional") == pytest.approx(
        [1 / 14, 4 / 14, 9 / 14], abs=1e-15
    )
    # T = 2: p ∝ sqrt(n) = 10, 20, 30
    assert task_probabilities(sizes, [1, 1, 1], "temperature", 2.0) == pytest.approx(
        [1 / 6, 2 / 6, 3 / 6], abs=1e-15
    )
    assert task_probabilities(sizes, [1, 1, 1], "temperature", 1.0) == pytest.approx(
        task_probabilities(sizes, [1, 1, 1], "proportional"), abs=1e-15
    )
    # T -> inf approaches uniform; T = 0.5 sharpens: p ∝ n^2
    assert task_probabilities(sizes, [1, 1, 1], "temperature", 0.5) == pytest.approx(
        [1e4 / 98e4, 16e4 / 98e4, 81e4 / 98e4], abs=1e-15
    )
    assert task_probabilities(sizes, [1, 1, 1], "round-robin") == [1 / 3] * 3
    # weights scale the loss, not the sampling; a weight-0 task is never drawn
    assert task_probabilities(sizes, [2.0, 0, 0.5], "proportional") == [0.1, 0.0, 0.9]
    assert task_probabilities(sizes, [1, 0, 1], "temperature", 2.0) == [0.25, 0.0, 0.75]
    assert task_probabilities(sizes, [0, 1, 3], "round-robin") == [0.0, 0.5, 0.5]


def test_sampler_draws_follow_p_and_resume_exactly():
    sampler = TaskSampler([0.25, 0.0, 0.75], round_robin=False, seed=0)
    draws = [sampler.next() for _ in range(20000)]
    assert draws.count(1) == 0 and sampler.counts == [draws.count(0), 0, draws.count(2)]
    assert draws.count(0) / 20000 == pytest.approx(0.25, abs=0.01)
    again = TaskSampler([0.25, 0.0, 0.75], round_robin=False, seed=0)
    assert [again.next() for _ in range(500)] == draws[:500]
    state = again.state_dict()
    expected = [again.next() for _ in range(100)]
    resumed = TaskSampler([0.25, 0.0, 0.75], round_robin=False, seed=99)
    resumed.load_state_dict(state)
    assert [resumed.next() for _ in range(100)] == expected == draws[500:600]


def test_round_robin_takes_the_trained_tasks_in_turn():
    p = task_probabilities([5, 100, 7], [1, 0, 2], "round-robin")
    sampler = TaskSampler(p, round_robin=True, seed=0)
    assert [sampler.next() for _ in range(5)] == [0, 2, 0, 2, 0]
    resumed = TaskSampler(p, round_robin=True, seed=0)
    resumed.load_state_dict(sampler.state_dict())
    assert [resumed.next() for _ in range(3)] == [2, 0, 2]


# --- model and loss ----------------------------------------------------------------------------
def _tasks(files, specs):
    """Task objects over one freshly tied model set, dropout off (gradients stay exact)."""
    tokenizer = files["tokenizer"]
    read = [read_task(spec, tokenizer, 32) for spec in specs]
    base = load_checkpoint(files["base"]).model
    models = task_models(base, specs, [labels for _, _, labels, _ in read])
    return [
        Task(spec, model.eval(), train, dev, labels, 32, masker, torch.Generator().manual_seed(0))
        for spec, model, (train, dev, labels, masker) in zip(specs, models, read, strict=True)
    ]


def test_one_encoder_gets_gradients_from_every_task(files):
    specs = [TaskSpec(**d) for d in task_dicts(files)]
    cls, ner, mlm = tasks = _tasks(files, specs)
    assert cls.model.h is ner.model.h is mlm.model.h
    assert cls.model.embeddings is mlm.model.embeddings and ner.model.pooler is None
    encoder = sum(
        p.numel() for n, p in cls.model.named_parameters() if not n.startswith("classifier")
    )
    heads = sum(p.numel() for t in tasks for n, p in t.model.named_parameters()
                if n.startswith(("classifier", "mlm.")))  # fmt: skip
    assert (
        sum(p.numel() for p in nn.ModuleList([t.model for t in tasks]).parameters())
        == encoder + heads
    )

    shared = cls.model.h[0].attn.c_attn.weight

    def batch_of(task):  # the same rows and masking every time
        return task.batch(list(range(8)), 0, torch.Generator().manual_seed(1))

    grads = {}
    for task in tasks:
        batch = batch_of(task)
        weighted_loss(task, batch)[0].backward()
        grads[task.name] = shared.grad.clone()
        assert shared.grad.abs().sum() > 0, task.name
        others = [t for t in tasks if t is not task]
        for other in others:  # the heads of the other tasks get nothing
            head = other.model.classifier if other.model.classifier is not None else other.model.mlm
            assert all(p.grad is None for p in head.parameters()), (task.name, other.name)
        if task is not cls:  # only sentence classification reads the pooler
            assert cls.model.pooler.weight.grad is None
        for t in tasks:
            t.model.zero_grad(set_to_none=True)
    # the weighted losses of the tasks add up on the shared weights
    total = sum(weighted_loss(t, batch_of(t))[0] for t in tasks)
    total.backward()
    torch.testing.assert_close(shared.grad, sum(grads.values()), rtol=1e-5, atol=1e-7)


def test_weighted_loss_is_lambda_times_the_task_loss(files):
    spec = TaskSpec(**{**task_dicts(files)[0], "weight": 0.25})
    [task] = _tasks(files, [spec])
    batch = collate(task.train[:8], 0)
    weighted, raw = weighted_loss(task, batch)
    assert raw.item() == task_loss(task.model, batch).item()
    assert weighted.item() == 0.25 * raw.item()


def test_mlm_batches_mask_with_the_task_generator(files):
    specs = [TaskSpec(**task_dicts(files)[2])]
    [task] = _tasks(files, specs)
    a = task.batch(list(range(8)), 0, torch.Generator().manual_seed(3))
    b = task.batch(list(range(8)), 0, torch.Generator().manual_seed(3))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    masked = a["labels"] != -100
    assert masked.sum(1).ge(1).all()  # every row has a target
    original = collate(task.train[:8], 0)["input_ids"]
    assert torch.equal(a["labels"][masked], original[masked])


# --- whole runs --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(files):
    out = files["root"] / "run"
    return out, finetune_multitask(config(files), out, progress=False)


def test_run_logs_every_task_and_the_weighted_score(run):
    out, result = run
    assert result.stop_reason == "steps" and result.steps == 24
    assert sum(result.task_steps.values()) == 24 and all(n > 0 for n in result.task_steps.values())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [8, 16, 24]
    last = records[-1]
    assert {"dev_accuracy", "dev_macro_f1"} <= set(last["tasks"]["cls"])
    assert {"dev_precision", "dev_recall", "dev_f1", "dev_accuracy"} <= set(last["tasks"]["ner"])
    mlm = last["tasks"]["mlm"]
    assert mlm["dev_perplexity"] == pytest.approx(math.exp(mlm["dev_loss"]))
    assert {t: r["train_steps"] for t, r in last["tasks"].items()} == result.task_steps
    for r in records:
        tasks = r["tasks"]
        assert tasks["cls"]["score"] == tasks["cls"]["dev_accuracy"]
        assert tasks["ner"]["score"] == tasks["ner"]["dev_f1"]  # IOB2 tags: entity F1
        assert tasks["mlm"]["score"] == tasks["mlm"]["dev_accuracy"]
        expected = (
            tasks["cls"]["score"] + tasks["ner"]["score"] + 0.5 * tasks["mlm"]["score"]
        ) / 2.5
        assert r["score"] == pytest.approx(expected, abs=1e-12)
    assert result.best_score == max(r["score"] for r in records)
    best = json.loads((out / "best" / "multitask.json").read_text())
    assert best["step"] == result.best_step and best["score"] == result.best_score
    assert (out / "loss.png").stat().st_size > 0 and (out / "last" / "state.pt").is_file()
    assert not (out / "best" / "state.pt").exists()


def test_per_task_checkpoints_are_the_in_memory_models(run, files):
    out, result = run
    ckpts = {name: load_checkpoint(out / "last" / name) for name in ("cls", "ner", "mlm")}
    # every checkpoint carries the same (shared) encoder
    encoder = {
        k: v
        for k, v in ckpts["ner"].model.state_dict().items()
        if k.startswith(("embeddings.", "h."))
    }
    for ckpt in ckpts.values():
        state = ckpt.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in encoder.items())
    texts = ["we saw a good movie", "alice went to paris with bob"]
    batch = files["tokenizer"].encode_for_encoder(texts, max_length=32)
    for name, ckpt in ckpts.items():
        trained = result.models[name].eval()
        with torch.no_grad():
            ours, theirs = trained(**batch), ckpt.model(**batch)
        key = "mlm_logits" if name == "mlm" else "logits"
        assert torch.equal(getattr(ours, key), getattr(theirs, key)), name
    assert ckpts["cls"].model.config.labels == ["neg", "pos"]
    assert ckpts["ner"].model.config.labels == ["B-LOC", "B-PER", "O"]
    assert ckpts["cls"].meta["task"] == "classification" and ckpts["cls"].meta["step"] == 24
    # the existing tools take them unchanged
    [label] = predict(ckpts["cls"].model, ckpts["cls"].tokenizer, texts[:1])
    probs = result.models["cls"](**files["tokenizer"].encode_for_encoder(texts[:1])).logits.softmax(
        -1
    )
    assert label["label"] == ["neg", "pos"][int(probs.argmax())]
    [tagged] = predict(ckpts["ner"].model, ckpts["ner"].tokenizer, texts[1:])
    assert len(tagged["tags"]) == 6 and set(tagged["tags"]) <= {"B-LOC", "B-PER", "O"}
    assert (
        len(fill_mask(ckpts["mlm"].model, ckpts["mlm"].tokenizer, "a good [MASK]", top_k=2)[0]) == 2
    )
    best = load_checkpoint(out / "best" / "ner")
    assert best.meta["step"] == result.best_step and "f1" in best.meta["dev"]


def test_zero_weight_task_is_scored_but_never_trained(files, tmp_path):
    cfg = config(files, mlm=False, weights={"ner": 0.0}, steps=8, eval_every=8)
    result = finetune_multitask(cfg, tmp_path / "run", progress=False)
    assert result.task_steps == {"cls": 8, "ner": 0}
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["tasks"]["ner"]["train_loss"] is None and "dev_f1" in record["tasks"]["ner"]
    assert record["score"] == record["tasks"]["cls"]["score"]  # λ = 0: no say in `best`
    # the head as the run initialised it: same seed, same construction
    base = load_checkpoint(files["base"]).model
    torch.manual_seed(cfg.seed)
    initial = task_models(base, cfg.tasks, [["neg", "pos"], ["B-LOC", "B-PER", "O"]])
    ner = load_checkpoint(tmp_path / "run" / "last" / "ner").model
    assert torch.equal(ner.classifier.weight, initial[1].classifier.weight)
    assert torch.equal(ner.classifier.bias, initial[1].classifier.bias)
    # ... over the encoder the classification task trained
    cls = load_checkpoint(tmp_path / "run" / "last" / "cls").model
    assert torch.equal(ner.h[0].attn.c_attn.weight, cls.h[0].attn.c_attn.weight)
    assert not torch.equal(ner.h[0].attn.c_attn.weight, initial[1].h[0].attn.c_attn.weight)


def test_interrupted_run_resumes_exactly(files, tmp_path, monkeypatch):
    import lmforge.train.multitask as multitask

    # N = 20 steps straight, against 10 + resume 10. The seed draws cls ner ner cls cls cls cls
    # ner mlm mlm first: the stop falls between evaluations, after the mlm task's masking
    # generator has been used
    cfg = config(files, steps=20, eval_every=4)
    straight = finetune_multitask(cfg, tmp_path / "a", progress=False)
    with monkeypatch.context() as m:
        m.setattr(multitask, "_GracefulStop", lambda: _StopAfter(9))
        stopped = finetune_multitask(cfg, tmp_path / "b", progress=False)
    assert stopped.stop_reason == "interrupted" and stopped.steps == 10
    assert stopped.task_steps == {"cls": 5, "ner": 3, "mlm": 2}
    resumed = finetune_multitask(None, tmp_path / "b", progress=False, resume=True)
    assert resumed.steps == straight.steps == 20 and resumed.task_steps == straight.task_steps
    for name in ("cls", "ner", "mlm"):
        wa = load_checkpoint(tmp_path / "a" / "last" / name).model.state_dict()
        wb = load_checkpoint(tmp_path / "b" / "last" / name).model.state_dict()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [4, 8, 10, 12, 16, 20]  # the interrupted run scored where it stopped
    a = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert a[-1]["tasks"]["ner"]["dev_f1"] == b[-1]["tasks"]["ner"]["dev_f1"]
    assert a[-1]["tasks"]["mlm"]["dev_loss"] == b[-1]["tasks"]["mlm"]["dev_loss"]
    # a finished run resumes to nothing more
    again = finetune_multitask(None, tmp_path / "b", progress=False, resume=True)
    assert again.steps == 20 and again.history == []
    with pytest.raises(LmforgeError, match="holds no multi-task state"):
        finetune_multitask(None, tmp_path / "nothing", progress=False, resume=True)
    with pytest.raises(LmforgeError, match="already holds a fine-tuning run"):
        finetune_multitask(cfg, tmp_path / "a", progress=False)


def test_nan_loss_stops_before_the_step_and_names_the_task(files, tmp_path, monkeypatch):
    import lmforge.train.multitask as multitask

    monkeypatch.setattr(
        multitask, "task_loss", lambda model, batch: torch.tensor(float("nan"), requires_grad=True)
    )
    cfg = config(files, mlm=False, sampling="round-robin", temperature=None)
    with pytest.raises(
        LmforgeError, match=r"step 0: loss is nan \(task 'cls'\); no checkpoint was written"
    ):
        finetune_multitask(cfg, tmp_path / "nan", progress=False)
    assert not (tmp_path / "nan" / "last").exists()


# --- configuration -----------------------------------------------------------------------------
TOML = """
base = "{base}"
steps = 50
sampling = "temperature"
temperature = 3.0

[[tasks]]
name = "sst2"
type = "classification"
train_file = "{train}"
dev_file = "{dev}"
text_column = "sentence"

[[tasks]]
name = "ner"
type = "token-classification"
train_file = "{train_conll}"
dev_file = "{dev_conll}"
weight = 0.5
max_length = 64
"""

YAML = """
base: {base}
steps: 50
sampling: temperature
temperature: 3.0
tasks:
  - name: sst2
    type: classification
    train_file: {train}
    dev_file: {dev}
    text_column: sentence
  - name: ner
    type: token-classification
    train_file: {train_conll}
    dev_file: {dev_conll}
    weight: 0.5
    max_length: 64
"""


def test_toml_and_yaml_files_give_the_same_config(files, tmp_path):
    paths = dict(base=files["base"], train=files["train_tsv"], dev=files["dev_tsv"],
                 train_conll=files["train_conll"], dev_conll=files["dev_conll"])  # fmt: skip
    (tmp_path / "c.toml").write_text(TOML.format(**paths))
    (tmp_path / "c.yaml").write_text(YAML.format(**paths))
    a, b = load_multitask_config(tmp_path / "c.toml"), load_multitask_config(tmp_path / "c.yaml")
    assert a == b
    assert a.temperature == 3.0 and [t.name for t in a.tasks] == ["sst2", "ner"]
    assert a.tasks[1] == TaskSpec(
        name="ner",
        type="token-classification",
        weight=0.5,
        max_length=64,
        train_file=str(files["train_conll"]),
        dev_file=str(files["dev_conll"]),
    )
    (tmp_path / "bad.toml").write_text(TOML.format(**paths).replace("weight = 0.5", "wieght = 0.5"))
    with pytest.raises(
        LmforgeError,
        match=r"bad.toml.*unknown config key 'tasks\[1\].wieght'; valid keys are: .*weight",
    ):
        load_multitask_config(tmp_path / "bad.toml")
    (tmp_path / "bad.yaml").write_text("stpes: 3\n" + YAML.format(**paths))
    with pytest.raises(LmforgeError, match="unknown config key 'stpes'; valid keys are: .*steps"):
        load_multitask_config(tmp_path / "bad.yaml")


def _task(**overrides):
    return {
        **dict(name="a", type="classification", train_file="t.tsv", dev_file="d.tsv"),
        **overrides,
    }


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(tasks=[]), "tasks must list at least one task"),
        (dict(base=""), "base is required"),
        (dict(tasks=[_task(), _task()]), "task name(s) 'a' used more than once"),
        (dict(tasks=[_task(weight=-1)]), "task 'a': weight must be a number >= 0, got -1"),
        (dict(tasks=[_task(weight=0), _task(name="b", weight=0)]), "every task has weight 0"),
        (dict(tasks=[_task(name="a/b")]), "task name 'a/b' is not valid"),
        (dict(tasks=[_task(type="ner")]), "type='ner' is not valid"),
        (dict(tasks=[_task(train_file="")]), "task 'a': train_file is required"),
        (
            dict(tasks=[_task(type="token-classification", text_column="x")]),
            "text_column do(es) not apply",
        ),
        (
            dict(tasks=[_task(mlm_probability=0.2)]),
            "mlm_probability do(es) not apply to type 'classification'",
        ),
        (dict(tasks=[_task(type="mlm", mlm_probability=1.5)]), "mlm_probability must be in (0, 1)"),
        (dict(tasks=[_task(max_length=2)]), "max_length must be >= 3"),
        (dict(tasks=["a"]), "tasks[0] must be a table"),
        (dict(tasks=[_task(wieght=1)]), "unknown config key 'tasks[0].wieght'"),
        (dict(sampling="uniform"), "sampling='uniform' is not valid"),
        (dict(temperature=2.0), "temperature applies to sampling='temperature' only"),
        (dict(sampling="temperature", temperature=0.0), "temperature must be > 0"),
        (dict(steps=0), "steps must be >= 1"),
        (dict(warmup_ratio=1.0), "warmup_ratio must be in [0, 1)"),
    ],
)
def test_config_validation(overrides, fragment):
    with pytest.raises(LmforgeError) as e:
        MultitaskConfig(**{**dict(base="b", tasks=[_task()]), **overrides})
    assert fragment in str(e.value)


def test_temperature_defaults_to_two():
    assert MultitaskConfig(base="b", tasks=[_task()], sampling="temperature").temperature == 2.0


def test_missing_files_and_wrong_mlm_file(files, tmp_path):
    cfg = config(files, mlm=False)
    cfg.tasks[0].train_file = str(tmp_path / "nope.tsv")
    cfg.tasks[1].dev_file = str(tmp_path / "nope.conll")
    with pytest.raises(
        LmforgeError,
        match=r"not found: cls.train_file = '.*nope.tsv'; ner.dev_file = '.*nope.conll'",
    ):
        finetune_multitask(cfg, tmp_path / "o1", progress=False)
    cfg = config(files)
    cfg.tasks[2].train_file = str(files["train_tsv"])
    with pytest.raises(
        LmforgeError, match=r"task 'mlm': .*train.tsv.*plain text, one example a line"
    ):
        finetune_multitask(cfg, tmp_path / "o2", progress=False)

"""`lmforge finetune --task multitask` as a user runs it: a TOML file with a classification and an
NER task over one tiny BERT, then `lmforge predict` on each task's checkpoint."""

import json

import pytest

from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.tokenizer import train_tokenizer
from tests.cli.test_cli import lmforge
from tests.models.test_bert import tiny_bert
from tests.train.test_finetune import NAMES, PLACES, _sentences, _tagged, write_conll, write_tsv

CONFIG = """
base = "{base}"
steps = 96
eval_every = 48
batch_size = 8
lr = 2e-3
precision = "fp32"
device = "cpu"
sampling = "round-robin"

[[tasks]]
name = "sentiment"
type = "classification"
train_file = "{root}/train.tsv"
dev_file = "{root}/dev.tsv"

[[tasks]]
name = "ner"
type = "token-classification"
train_file = "{root}/train.conll"
dev_file = "{root}/dev.conll"
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("multitask_cli")
    texts = [t for _, t in _sentences(50, 0)] + [" ".join(NAMES + PLACES + ["good", "bad"])]
    tok = train_tokenizer("wordpiece", texts, vocab_size=120)
    save_checkpoint(root / "base", tiny_bert(vocab_size=tok.vocab_size, head="mlm"), tok)
    write_tsv(root / "train.tsv", _sentences(64, 1))
    write_tsv(root / "dev.tsv", _sentences(16, 2))
    write_conll(root / "train.conll", _tagged(64, 3))
    write_conll(root / "dev.conll", _tagged(16, 4))
    (root / "mt.toml").write_text(CONFIG.format(base=root / "base", root=root))
    return root


def test_multitask_finetune_then_predict_each_task(workdir):
    run = workdir / "run"
    out = lmforge("finetune", "--task", "multitask", "--config", workdir / "mt.toml", "--out", run,
                  "--no-progress").stdout  # fmt: skip
    # round-robin: the two tasks take turns
    assert "stopped (steps) at step 96" in out and "steps per task: sentiment 48, ner 48" in out, (
        out
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [48, 96]
    final = records[-1]["tasks"]
    assert final["sentiment"]["dev_accuracy"] == 1.0 and final["ner"]["dev_f1"] == 1.0, final
    assert {p.name for p in (run / "best").iterdir()} == {"sentiment", "ner", "multitask.json"}
    assert (run / "loss.png").is_file() and (run / "last" / "state.pt").is_file()

    rows = json.loads(lmforge("predict", run / "best" / "sentiment", "--text", "the movie was good",
                              "--text", "the plot was bad", "--json").stdout)  # fmt: skip
    assert [r["label"] for r in rows] == ["pos", "neg"]
    [row] = json.loads(lmforge("predict", run / "best" / "ner", "--text", "alice went to paris",
                               "--json").stdout)  # fmt: skip
    assert row["tags"] == ["B-PER", "O", "O", "B-LOC"]
    assert [(e["entity"], e["text"]) for e in row["entities"]] == [
        ("PER", "alice"),
        ("LOC", "paris"),
    ]

    # --resume finds the multi-task run by itself; a finished run has nothing left to do
    again = lmforge("finetune", "--out", run, "--resume", "--no-progress").stdout
    assert "stopped (steps) at step 96" in again, again


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--task", "multitask", "--config", "{cfg}", "--base", "x", "--epochs", "2"],
         "--base, --epochs do(es) not apply to --task multitask"),
        (["--task", "multitask"], "--task multitask needs --config FILE"),
        (["--task", "classification", "--config", "{cfg}"], "--config is for --task multitask"),
        (["--task", "multitask", "--config", "{cfg}", "--resume"], "drop --config"),
        (["--task", "multitask", "--config", "{bad}"], "unknown config key 'tasks[0].labels'"),
        (["--task", "multitask", "--config", "{missing}"], "data file(s) not found: a.train_file"),
    ],
)  # fmt: skip
def test_multitask_cli_errors(workdir, tmp_path, capsys, extra, fragment):
    (tmp_path / "bad.yaml").write_text(
        "base: b\ntasks:\n  - {name: a, train_file: t.tsv, dev_file: d.tsv, labels: [x]}\n"
    )
    (tmp_path / "missing.yaml").write_text(
        f"base: {workdir / 'base'}\ntasks:\n  - {{name: a, train_file: t.tsv, dev_file: d.tsv}}\n"
    )
    paths = dict(
        cfg=workdir / "mt.toml", bad=tmp_path / "bad.yaml", missing=tmp_path / "missing.yaml"
    )
    argv = ["finetune", "--out", str(tmp_path / "run"), *(a.format(**paths) for a in extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lmforge: error:") and fragment in err[-1], err

"""Chat fine-tuning: assistant-only labels, the loss over them, a short SFT run, and one chat
template shared by training, the server and `lmforge chat`."""

import json

import pytest
import torch

from lmforge.chat import (
    DEFAULT_CHAT_STOP,
    DEFAULT_CHAT_TEMPLATE,
    SFT_CHAT_TEMPLATE,
    ChatTemplate,
    chat_loop,
    encode_chat,
    read_chats,
)
from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.data.tasks import IGNORE_INDEX
from lmforge.errors import LmforgeError
from lmforge.tokenizer import train_tokenizer
from lmforge.train.chat import (
    ChatConfig,
    chat_loss,
    collate_chat,
    dev_loss,
    encode_chats,
    finetune_chat,
)
from tests.conftest import SAMPLE_TEXT, tiny_gpt

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "The quick fox?"},
    {"role": "assistant", "content": "A lazy dog."},
    {"role": "user", "content": "Pack my box"},
    {"role": "assistant", "content": "with five dozen jugs!"},
]
CHATS = [
    [{"role": "user", "content": "The quick brown fox"}, {"role": "assistant", "content": "jumps over the lazy dog."}],
    [{"role": "user", "content": "Pack my box"}, {"role": "assistant", "content": "with five dozen liquor jugs!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How vexingly quick"},
     {"role": "assistant", "content": "daft zebras jump?"}],
    CHAT,
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("bpe", [SAMPLE_TEXT], vocab_size=300)


def sft_template(tok, source=SFT_CHAT_TEMPLATE):
    tok.chat_template = source
    return ChatTemplate.for_tokenizer(tok)


def labelled_runs(labels):
    """The labelled token ids, one list per contiguous run."""
    runs, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs, current = runs + [current], []
    return runs


def test_labels_are_the_assistant_messages_and_their_end_of_turn(tok):
    template = sft_template(tok)
    ids, labels = encode_chat(template, tok, CHAT, max_length=1000)
    assert len(ids) == len(labels)
    runs = labelled_runs(labels)
    assistant = [m["content"] for m in CHAT if m["role"] == "assistant"]
    assert [tok.decode(run) for run in runs] == [f" {a}{tok.eos_token}" for a in assistant]
    assert all(run[-1] == tok.eos_id for run in runs)
    # everything else (system, user, role headers) is a prompt token
    prompt = tok.decode([i for i, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX])
    assert "Be brief." in prompt and "The quick fox?" in prompt and "Pack my box" in prompt
    assert "lazy" not in prompt and "jugs" not in prompt
    # labelled tokens carry their own ids
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels, strict=True))


@pytest.mark.parametrize("source", [SFT_CHAT_TEMPLATE, DEFAULT_CHAT_TEMPLATE])
def test_pieces_tokenize_as_the_whole_text(tok, source):
    # cutting the text at the assistant spans changes no token: the ids are the full rendering's,
    # and the prompt before each reply tokenizes as the generation prompt the model is served
    template = sft_template(tok, source)
    for chat in CHATS:
        ids, labels = encode_chat(template, tok, chat, max_length=1000)
        assert ids == tok.encode(template.render(chat, add_generation_prompt=False))
        for k, m in enumerate(chat):
            if m["role"] == "assistant":
                header = tok.encode(template.render(chat[:k]))
                assert ids[: len(header)] == header and labels[len(header) - 1] == IGNORE_INDEX
                assert labels[len(header)] == ids[len(header)]


def test_truncation_keeps_what_fits_and_drops_chats_without_assistant_tokens(tok):
    template = sft_template(tok)
    full, _ = encode_chat(template, tok, CHAT, max_length=1000)
    first_reply = tok.encode(template.render(CHAT[:2]))
    ids, labels = encode_chat(template, tok, CHAT, max_length=len(first_reply) + 3)
    assert ids == full[: len(first_reply) + 3] and sum(x != IGNORE_INDEX for x in labels) == 3
    assert encode_chat(template, tok, CHAT, max_length=len(first_reply)) is None
    features, dropped = encode_chats(template, tok, CHATS, max_length=len(first_reply))
    assert dropped >= 1 and len(features) + dropped == len(CHATS)


def test_a_template_that_does_not_grow_the_text_is_refused(tok):
    reversed_template = sft_template(
        tok, "{% for m in messages|reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(LmforgeError, match="prefix"):
        encode_chat(reversed_template, tok, CHAT, max_length=1000)


def test_a_batch_without_assistant_tokens_gives_zero_loss_and_no_nan(tok):
    model = tiny_gpt(tok.vocab_size, block_size=64).train()
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX] * 4},
            {"input_ids": [9, 10], "labels": [9, IGNORE_INDEX]}]  # position 0 is never a target
    loss = chat_loss(model, collate_chat(rows, pad_id=0))
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)


def test_loss_is_the_mean_over_labelled_next_tokens(tok):
    model = tiny_gpt(tok.vocab_size, block_size=64)
    template = sft_template(tok)
    features, _ = encode_chats(template, tok, CHATS, max_length=64)
    batch = collate_chat(features, pad_id=tok.eos_id)
    logits = model(batch["input_ids"]).float()
    per_token = []
    for b, f in enumerate(features):
        for t in range(1, len(f["input_ids"])):
            if f["labels"][t] != IGNORE_INDEX:
                per_token.append(-torch.log_softmax(logits[b, t - 1], -1)[f["labels"][t]])
    expected = torch.stack(per_token).mean()
    assert torch.allclose(chat_loss(model, batch), expected, atol=1e-5)


def write_chats(path, chats):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return path


def test_read_chats_names_the_bad_line(tmp_path):
    good = json.dumps({"messages": CHAT})
    cases = {
        "not json": "chats.jsonl:2: not valid JSON",
        json.dumps(["hi"]): "chats.jsonl:2: expected a JSON object",
        json.dumps({"text": "hi"}): 'chats.jsonl:2: expected an object {"messages"',
        json.dumps({"messages": [{"role": "bot", "content": "x"}]}): "chats.jsonl:2: message 0 has role 'bot'",
        json.dumps({"messages": [{"role": "user"}]}): "chats.jsonl:2: message 0 (user) has no text",
        json.dumps({"messages": [{"role": "user", "content": "x"}]}): "chats.jsonl:2: the conversation has no assistant",
        json.dumps({"messages": []}): 'chats.jsonl:2: "messages" must be a non-empty list',
    }
    path = tmp_path / "chats.jsonl"
    for bad, message in cases.items():
        path.write_text(f"{good}\n{bad}\n")
        with pytest.raises(LmforgeError) as e:
            read_chats(path)
        assert message in str(e.value)
    path.write_text("\n")
    with pytest.raises(LmforgeError, match="holds no conversations"):
        read_chats(path)
    with pytest.raises(LmforgeError, match="does not exist"):
        read_chats(tmp_path / "missing.jsonl")
    assert read_chats(write_chats(tmp_path / "ok.jsonl", CHATS)) == CHATS


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("chat") / "base"
    torch.manual_seed(0)
    save_checkpoint(path, tiny_gpt(tok.vocab_size, block_size=96), tok)
    return path


def test_sft_lowers_the_assistant_loss_and_stores_the_template(tmp_path, base):
    train_file = write_chats(tmp_path / "train.jsonl", CHATS * 2)
    before = load_checkpoint(base)
    template = ChatTemplate(SFT_CHAT_TEMPLATE, tokenizer=before.tokenizer)
    features, _ = encode_chats(template, before.tokenizer, CHATS, 96)
    loss_before = dev_loss(before.model, features, 4, 0, torch.device("cpu"), torch.autocast("cpu", enabled=False))

    config = ChatConfig(epochs=10, batch_size=2, lr=1e-2, precision="fp32", device="cpu", warmup_ratio=0.0)
    result = finetune_chat(base, train_file, tmp_path / "run", dev_file=train_file, config=config, progress=False)
    assert result.steps == 40 and result.dropped == 0 and result.conversations == 8
    assert result.best_dev_loss < 0.7 * loss_before
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < losses[0]
    for name in ("best", "last"):
        config_file = tmp_path / "run" / name / "tokenizer_config.json"
        assert json.loads(config_file.read_text())["chat_template"] == SFT_CHAT_TEMPLATE

    # the server, `lmforge chat` (both ChatTemplate.for_checkpoint) and training render alike
    from lmforge.serve.app import create_app

    tuned = load_checkpoint(tmp_path / "run")
    server_template = create_app(tuned, engine=object()).state.chat_template
    messages = CHAT[:4]
    assert server_template.render(messages) == template.render(messages)
    assert server_template.stop == []  # the turn ends with end-of-text, no stop string needed
    after = dev_loss(tuned.model, features, 4, 0, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert after == pytest.approx(result.best_dev_loss, rel=1e-4)
    with pytest.raises(LmforgeError, match="already holds a run"):
        finetune_chat(base, train_file, tmp_path / "run", config=config, progress=False)


def test_a_base_without_end_of_text_needs_a_template(tmp_path):
    char = train_tokenizer("char", [SAMPLE_TEXT + "system: user: assistant: Be brief."])
    save_checkpoint(tmp_path / "char", tiny_gpt(char.vocab_size, block_size=96), char)
    train_file = write_chats(tmp_path / "c.jsonl", CHATS)
    with pytest.raises(LmforgeError, match="end-of-text"):
        finetune_chat(tmp_path / "char", train_file, tmp_path / "run", progress=False)
    # the default template ends a turn with a newline, which the char tokenizer has
    config = ChatConfig(epochs=1, precision="fp32", device="cpu")
    finetune_chat(tmp_path / "char", train_file, tmp_path / "run", config=config,
                  chat_template=DEFAULT_CHAT_TEMPLATE, progress=False)
    template = ChatTemplate.for_checkpoint(load_checkpoint(tmp_path / "run"))
    assert template.source == DEFAULT_CHAT_TEMPLATE and template.stop == DEFAULT_CHAT_STOP


def test_chat_loop_keeps_history_resets_and_exits():
    seen = []

    def reply(history, emit):
        seen.append([m["content"] for m in history])
        emit(" ok")
        return " ok "

    out = []
    history = chat_loop(reply, ["hi\n", "\n", "again\n", "/reset\n", "new\n", "/exit\n", "never\n"],
                        out.append, system="sys")
    assert seen == [["sys", "hi"], ["sys", "hi", "ok", "again"], ["sys", "new"]]
    assert history == [{"role": "system", "content": "sys"}, {"role": "user", "content": "new"},
                       {"role": "assistant", "content": "ok"}]
    assert "".join(out).count("assistant: ok\n") == 3 and "(history cleared)" in "".join(out)


def test_hugging_face_renders_the_saved_template_alike(tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    template = sft_template(tok)
    tok.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    messages = CHAT[:4]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == template.render(messages)
    assert hf.apply_chat_template(CHAT, tokenize=False) == template.render(CHAT, add_generation_prompt=False)

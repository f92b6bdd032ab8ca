"""Conversations: the one chat template that the server, `lmforge chat` and chat fine-tuning share,
the JSONL conversation files SFT reads, and the token labels that train only the assistant.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`.
It becomes a prompt through a Jinja2 template, as Hugging Face does it: the checkpoint's own
(`chat_template` in tokenizer_config.json), else `DEFAULT_CHAT_TEMPLATE`. Rendering goes through
`ChatTemplate` everywhere, so a model answers the server exactly as it was fine-tuned to.

Chat fine-tuning (`lmforge.train.chat`) stores `SFT_CHAT_TEMPLATE` with the model unless the base
checkpoint has its own: each assistant turn ends with the end-of-text token, so generation stops at
the end of the reply without a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

# the parallel-data JSONL reader: gzip, UTF-8 and missing-file errors, lines named FILE:LINE
from lmforge.data.parallel import _jsonl_rows as jsonl_rows
from lmforge.data.tasks import IGNORE_INDEX
from lmforge.errors import LmforgeError

ROLES = ("system", "user", "assistant")
# A base model has no chat format of its own: one "role: content" line per message, then the
# assistant's turn; generation stops where the model starts the user's next line.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
DEFAULT_CHAT_STOP = ["\nuser:"]
# The same lines for a fine-tuned model, whose assistant turns end with end-of-text (the token the
# model learns to emit and generation stops at) instead of a newline.
SFT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}"
    "{{ eos_token if message['role'] == 'assistant' else '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatTemplateError(LmforgeError):
    """The template could not render these messages (its own `raise_exception`, or a Jinja error)."""


class ChatTemplate:
    """Renders messages into a prompt with a Jinja2 template: the checkpoint's own
    (`chat_template` in tokenizer_config.json, as Hugging Face stores it), else
    `DEFAULT_CHAT_TEMPLATE`, whose stop strings end the assistant's turn."""

    def __init__(self, source: str | None = None, stop: list[str] | None = None, tokenizer=None):
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:
            raise LmforgeError("chat templates need jinja2: pip install 'lmforge[serve]' (or jinja2)") from e

        self.source = source or DEFAULT_CHAT_TEMPLATE
        # a model's own template ends its turns its own way; the default's end where the user's begin
        own = source is not None and source != DEFAULT_CHAT_TEMPLATE
        self.stop = list(stop if stop is not None else ([] if own else DEFAULT_CHAT_STOP))
        # HF's rendering environment: sandboxed, blocks trimmed, `raise_exception` available
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        try:
            self.template = env.from_string(self.source)
        except TemplateError as e:
            raise LmforgeError(f"the chat template is not valid Jinja2: {e}") from e
        self.specials = {
            "bos_token": getattr(tokenizer, "bos_token", None) or "",
            "eos_token": getattr(tokenizer, "eos_token", None) or "",
        }

    @classmethod
    def for_tokenizer(cls, tokenizer) -> ChatTemplate:
        """The template a tokenizer carries (`Tokenizer.chat_template`), else the default."""
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, list):  # HF's named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in source}
            source = named.get("default") or next(iter(named.values()), None)
        return cls(source, tokenizer=tokenizer)

    @classmethod
    def for_checkpoint(cls, ckpt) -> ChatTemplate:
        return cls.for_tokenizer(ckpt.tokenizer)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.specials
            )
        except TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from e


def _raise_template_error(message: str) -> None:
    raise ChatTemplateError(f"chat template: {message}")


# --- conversation files ---------------------------------------------------------------------------


def check_messages(messages: object, where: str) -> list[dict[str, str]]:
    """`messages` as a list of {"role", "content"} dicts, or an LmforgeError that says `where`."""
    if not isinstance(messages, list) or not messages:
        raise LmforgeError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise LmforgeError(f"{where}: message {i} has role {role!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise LmforgeError(f"{where}: message {i} ({m['role']}) has no text \"content\" string")
        checked.append({"role": m["role"], "content": m["content"]})
    return checked


def read_chats(path: str | Path) -> list[list[dict[str, str]]]:
    """The conversations of a JSONL file, one `{"messages": [...]}` a line (blank lines skipped);
    each must have at least one assistant message, the only text that is trained on. Errors name
    the line as `FILE:LINE`."""
    chats = []
    for where, record in jsonl_rows(Path(path)):
        if "messages" not in record:
            raise LmforgeError(f"{where}: expected an object {{\"messages\": [...]}}")
        messages = check_messages(record["messages"], where)
        if not any(m["role"] == "assistant" for m in messages):
            raise LmforgeError(f"{where}: the conversation has no assistant message to learn from")
        chats.append(messages)
    if not chats:
        raise LmforgeError(f"conversation file {str(path)!r} holds no conversations")
    return chats


# --- token labels ---------------------------------------------------------------------------------


def encode_chat(
    template: ChatTemplate, tokenizer, messages: list[dict[str, str]], max_length: int
) -> tuple[list[int], list[int]] | None:
    """Token ids of the rendered conversation and their labels: each assistant message's own
    tokens (the end-of-turn the template adds included) keep their id, all else is IGNORE_INDEX.
    Cut to `max_length` tokens; None when no labelled token is left to predict.

    The text is cut where the template's own renderings of the growing conversation end: before
    assistant message k lies render(messages[:k], add_generation_prompt=True), its end is
    render(messages[:k + 1]). Each piece is tokenized by itself, as the reply is at inference
    time: generation continues the tokens of the prompt, it never re-tokenizes across them."""
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the text tokenized so far

    def add(text: str, labelled: bool) -> None:
        nonlocal done
        if not text:
            return
        piece = tokenizer.encode(text)
        ids.extend(piece)
        labels.extend(piece if labelled else [IGNORE_INDEX] * len(piece))
        done += text

    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        header = template.render(messages[:k], add_generation_prompt=True)
        turn = template.render(messages[: k + 1], add_generation_prompt=False)
        if not header.startswith(done) or not turn.startswith(header):
            raise LmforgeError(
                "the chat template does not render a conversation as a growing text (the prompt "
                f"before assistant message {k} is not a prefix of the conversation after it), so the "
                "assistant's tokens cannot be found; use a template that appends each message"
            )
        add(header[len(done):], labelled=False)
        add(turn[len(header):], labelled=True)
    add(template.render(messages, add_generation_prompt=False)[len(done):], labelled=False)
    ids, labels = ids[:max_length], labels[:max_length]
    # position 0 is never a target: the loss predicts token t + 1 from tokens ..t
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return ids, labels


# --- the terminal chat ----------------------------------------------------------------------------


def chat_loop(
    reply: Callable[[list[dict[str, str]], Callable[[str], None]], str],
    lines: Iterable[str],
    write: Callable[[str], None],
    system: str | None = None,
) -> list[dict[str, str]]:
    """A conversation over `lines` (user turns; `/exit` ends, `/reset` clears the history):
    `reply(history, emit)` answers the history, streaming its text through `emit`. Returns the
    history as it ends."""
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    for line in lines:
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = list(start)
            write("(history cleared)\n")
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        write("assistant:")  # the reply brings its own leading space, as the model learnt it
        try:
            answer = reply(history, write)
        except LmforgeError as e:  # e.g. the history outgrew the context: say so, keep chatting
            history.pop()
            write(f"[{e}]\n")
            continue
        write("\n")
        # the template puts its own space after "assistant:", as in the training data
        history.append({"role": "assistant", "content": answer.strip()})
    return history

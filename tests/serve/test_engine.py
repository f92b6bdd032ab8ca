"""The continuous-batching engine: every sequence gets offline `generate`'s tokens whatever it is
batched with, requests join and leave mid-flight, and the queue, cancellation and timeouts."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.generate import GenerationConfig, generate
from lmforge.serve import Engine, Event, QueueFull
from lmforge.tokenizer import train_tokenizer
from tests.conftest import SAMPLE_TEXT, tiny_gpt


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer("bpe", [SAMPLE_TEXT], vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    model = tiny_gpt(tokenizer.vocab_size, block_size=64)
    with torch.no_grad():  # sharper than at init, so that choices are not near-ties
        model.lm_head.weight.mul_(3)
    return model


class Collector:
    """on_event for one sequence: keeps its events, optionally acting on each."""

    def __init__(self, action=None):
        self.events: list[Event] = []
        self.action = action

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if self.action:
            self.action(self)

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)


def offline(model, tokenizer, prompt: str, config: GenerationConfig, choice: int = 0):
    n = max(config.num_return_sequences, choice + 1)
    config = GenerationConfig(**{**vars(config), "num_return_sequences": n})
    return generate(model, tokenizer, prompt, config)[choice]


PROMPTS = ["The quick brown fox", "Pack", "How vexingly quick daft zebras jump?", "A", "jumps over"]
CASES = [
    dict(do_sample=False, max_new_tokens=20),
    dict(seed=1, max_new_tokens=25),
    dict(seed=2, max_new_tokens=12, temperature=0.7, top_k=20),
    dict(seed=3, max_new_tokens=30, top_p=0.8),
    dict(seed=4, max_new_tokens=18, min_p=0.05, temperature=1.3),
    dict(seed=5, max_new_tokens=22, repetition_penalty=1.3, no_repeat_ngram_size=2),
    dict(seed=6, max_new_tokens=28, presence_penalty=1.5, frequency_penalty=0.5),
    dict(do_sample=False, max_new_tokens=24, presence_penalty=0.8, frequency_penalty=1.2),
    dict(seed=7, max_new_tokens=30, stop=["?"]),  # replaced by one the text holds
    dict(seed=8, max_new_tokens=9, min_new_tokens=5),
    dict(seed=None, max_new_tokens=1),
    dict(seed=9, max_new_tokens=35),
]


def test_concurrent_requests_give_offline_tokens(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer, max_batch_size=4, max_queue=64, max_len=56, start=False)
    shifts: list[int] = []
    shift = engine._shift
    monkeypatch.setattr(engine, "_shift", lambda by: (shifts.append(by), shift(by)))
    # an end-of-text the model does say: a token of its greedy continuation
    greedy = GenerationConfig(do_sample=False, max_new_tokens=8)
    frequent = offline(model, tokenizer, "The", greedy).token_ids[3]
    cases = [(PROMPTS[k % len(PROMPTS)], dict(options), k % 3) for k, options in enumerate(CASES)]
    # a stop string the sampled text does hold: a letter it says after its first few characters
    prompt, options, choice = next(c for c in cases if c[1].get("stop"))
    said = offline(model, tokenizer, prompt, GenerationConfig(**{**options, "stop": []}), choice).text
    options["stop"] = ["never said", next(c for c in said[3:] if c.isalnum())]
    cases += [("The", dict(do_sample=False, max_new_tokens=30, eos_token_id=frequent), 0),
              ("The", dict(seed=10, max_new_tokens=30, eos_token_id=frequent), 1)]
    jobs = []
    for prompt, options, choice in cases:
        config = GenerationConfig(**options)
        events = Collector()
        handle = engine.submit(tokenizer.encode(prompt), config, events, choice=choice)
        jobs.append((prompt, config, choice, events, handle))
    engine.start()  # all at once: 4 run, the rest join as rows free up
    try:
        for prompt, config, choice, events, handle in jobs:
            assert handle.wait(60)
            if config.do_sample and config.seed is None:  # fresh entropy: only the shape can be checked
                assert len(handle.token_ids) <= 1
                continue
            expected = offline(model, tokenizer, prompt, config, choice)
            assert handle.token_ids == expected.token_ids, (prompt, config, choice)
            assert handle.text == expected.text == events.text
            assert handle.finish_reason == expected.finish_reason
            last = events.events[-1]
            assert last.token_id is None
            assert last.finish_reason == ("stop" if expected.finish_reason == "eos" else expected.finish_reason)
            assert [e.finish_reason for e in events.events[:-1]] == [None] * (len(events.events) - 1)
            assert handle.completion_tokens == len(events.events) - 1 + (expected.finish_reason == "eos")
        assert {job[4].finish_reason for job in jobs} >= {"eos", "stop", "length"}
        # long rows made the shared write position reach the end (a left shift), and a prompt
        # longer than the running rows joined (a right shift)
        assert min(shifts) < 0 < max(shifts)
        assert engine.running == 0 and engine.queue_depth == 0
    finally:
        engine.close()


def test_a_request_joins_a_running_batch(model, tokenizer):
    with Engine(model, tokenizer, max_batch_size=4) as engine:
        started = threading.Event()
        long = Collector(lambda c: len(c.events) == 3 and started.set())
        config_a = GenerationConfig(seed=0, max_new_tokens=50)
        a = engine.submit(tokenizer.encode("The"), config_a, long)
        assert started.wait(30)
        config_b = GenerationConfig(seed=1, max_new_tokens=10, top_k=30)
        short = Collector()
        b = engine.submit(tokenizer.encode("Pack my box with five dozen"), config_b, short)
        assert a.wait(60) and b.wait(60)
        # b ran beside a: its last token came before a's
        assert short.events[-1].time < long.events[-1].time
        assert a.token_ids == offline(model, tokenizer, "The", config_a).token_ids
        assert b.token_ids == offline(model, tokenizer, "Pack my box with five dozen", config_b).token_ids


def test_cancel_frees_the_row_for_a_waiting_request(model, tokenizer):
    with Engine(model, tokenizer, max_batch_size=1, max_queue=1, start=False) as engine:
        first = Collector(lambda c: len(c.events) == 2 and a.cancel())  # the client leaves
        config = GenerationConfig(seed=0, max_new_tokens=50)
        a = engine.submit(tokenizer.encode("The"), config, first)
        waiting = Collector()
        b = engine.submit(tokenizer.encode("Pack"), GenerationConfig(seed=1, max_new_tokens=5), waiting)
        engine.start()
        assert a.wait(30) and b.wait(30)
        assert a.finish_reason == "cancelled" and first.events[-1].finish_reason == "cancelled"
        assert len(a.token_ids) < 50
        assert b.finish_reason == "length" and len(b.token_ids) == 5
        expected = offline(model, tokenizer, "Pack", GenerationConfig(seed=1, max_new_tokens=5))
        assert b.token_ids == expected.token_ids


def test_queue_full(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=2, max_queue=1, start=False)
    config = GenerationConfig(seed=0, max_new_tokens=4)
    handles = [engine.submit([5, 6], config, Collector()) for _ in range(3)]  # 2 rows + 1 waiting
    with pytest.raises(QueueFull, match="busy") as info:
        engine.submit([5, 6], config, Collector())
    assert info.value.retry_after >= 1
    engine.start()
    try:
        assert all(h.wait(30) and h.finish_reason == "length" for h in handles)
        engine.submit([5, 6], config, Collector()).wait(30)  # room again
    finally:
        engine.close()


def test_timeouts(model, tokenizer):
    with Engine(model, tokenizer) as engine:
        late = engine.submit([5, 6], GenerationConfig(max_new_tokens=5), Collector(), timeout=0.0)
        assert late.wait(30) and late.finish_reason == "timeout" and late.token_ids == []
        # a running sequence: each token takes a while, the deadline passes mid-way
        slow = Collector(lambda c: time.sleep(0.02))
        running = engine.submit([5, 6], GenerationConfig(max_new_tokens=50), slow, timeout=0.2)
        assert running.wait(30) and running.finish_reason == "timeout"
        assert 0 < len(running.token_ids) < 50 and slow.events[-1].finish_reason == "timeout"


def test_logprobs_are_the_models_own(model, tokenizer):
    config = GenerationConfig(seed=3, max_new_tokens=10, temperature=0.5, repetition_penalty=1.5)
    prompt = tokenizer.encode("The quick")
    with Engine(model, tokenizer) as engine:
        events = Collector()
        handle = engine.submit(prompt, config, events, logprobs=3)
        assert handle.wait(30)
    tokens = [e for e in events.events if e.token_id is not None]
    ids = torch.tensor([prompt + [e.token_id for e in tokens]])
    with torch.no_grad():
        logprobs = model(ids).log_softmax(-1)[0, len(prompt) - 1 : -1]  # (n, V): before each new token
    for e, row in zip(tokens, logprobs, strict=True):
        assert e.logprob == pytest.approx(row[e.token_id].item(), abs=1e-4)
        top = row.topk(3)
        assert [t for t, _ in e.top_logprobs] == top.indices.tolist()
        assert [lp for _, lp in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_requests_it_cannot_serve(model, tokenizer):
    from lmforge.models import EncoderDecoder, EncoderDecoderConfig
    from tests.models.test_bert import tiny_bert

    seq2seq = EncoderDecoder(EncoderDecoderConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32))
    for other in (tiny_bert(vocab_size=32), seq2seq):
        with pytest.raises(LmforgeError, match="decoder-only"):
            Engine(other, tokenizer)
    with Engine(model, tokenizer, max_len=32) as engine:
        with pytest.raises(LmforgeError, match="exceeds the server's limit of 32"):
            engine.submit([5] * 20, GenerationConfig(max_new_tokens=20), Collector())
        with pytest.raises(LmforgeError, match="beam search"):
            engine.submit([5], GenerationConfig(num_beams=2, do_sample=False), Collector())
        with pytest.raises(LmforgeError, match="token id 999"):
            engine.submit([5, 999], GenerationConfig(), Collector())

"""The decoding engine: batching, KV-cache equivalence, stopping, streaming and errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lmforge.config import from_dict
from lmforge.errors import LmforgeError
from lmforge.generate import Generation, GenerationConfig, generate, generate_ids
from lmforge.nn import KVCache
from tests.conftest import tiny_gpt

GREEDY = dict(do_sample=False)


class ScriptedLM(nn.Module):
    """A stand-in LM that, after a prompt of `prompt_len` tokens, greedily says `script` (and then
    repeats its last token): stopping and streaming can be checked against known text."""

    def __init__(self, vocab_size: int, script: list[int], prompt_len: int, block_size: int = 256):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, block_size=block_size)
        self.script, self.prompt_len = script, prompt_len
        self.dummy = nn.Parameter(torch.zeros(1))  # gives the engine a device

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return KVCache(1, batch_size, 1, max_len or self.config.block_size, 1)

    def forward(
        self, idx, *, attention_mask=None, position_ids=None, kv_cache=None, last_only=False
    ):
        past = kv_cache.pos if kv_cache is not None else 0
        if kv_cache is not None:
            kv_cache.advance(idx.shape[1])
        step = past + idx.shape[1] - self.prompt_len  # tokens generated so far
        logits = torch.zeros(idx.shape[0], 1, self.config.vocab_size)
        logits[..., self.script[min(step, len(self.script) - 1)]] = 1.0
        return logits


def scripted(tokenizer, continuation: str, prompt: str = "x") -> ScriptedLM:
    return ScriptedLM(
        tokenizer.vocab_size, tokenizer.encode(continuation), len(tokenizer.encode(prompt))
    )


def run(model, tokenizer, prompts, **config):
    pieces: dict[int, list[str]] = {}
    results = generate(
        model,
        tokenizer,
        prompts,
        GenerationConfig(**config),
        on_text=lambda i, piece: pieces.setdefault(i, []).append(piece),
    )
    return results, pieces


# --- lengths, counts, batching ------------------------------------------------------------------


def test_max_new_tokens_and_num_return_sequences(tiny_model, char_tokenizer):
    results, _ = run(
        tiny_model, char_tokenizer, ["The", "A quick"], max_new_tokens=7, num_return_sequences=3
    )
    assert len(results) == 6
    assert [r.prompt for r in results] == ["The"] * 3 + ["A quick"] * 3
    for r in results:
        assert isinstance(r, Generation)
        assert (
            len(r.token_ids) == 7 and r.finish_reason == "length"
        )  # the char tokenizer has no eos
        assert r.text == char_tokenizer.decode(r.token_ids)
        assert r.prompt_ids == char_tokenizer.encode(r.prompt)


@pytest.mark.parametrize("penalties", [{}, dict(repetition_penalty=1.5, no_repeat_ngram_size=2)])
def test_batched_prompts_match_each_prompt_alone(tiny_model, char_tokenizer, penalties):
    prompts = ["T", "The quick brown", "Pack my box"]
    ids = char_tokenizer.encode_batch(prompts)
    config = GenerationConfig(max_new_tokens=12, **GREEDY, **penalties)
    batched = generate_ids(tiny_model, ids, config)
    assert batched == [generate_ids(tiny_model, [p], config)[0] for p in ids]


# --- KV cache equivalence -----------------------------------------------------------------------

MODELS = {
    "learned": {},
    "rotary": dict(position="rotary"),
    "sinusoidal": dict(position="sinusoidal"),
    "modern": dict(position="rotary", n_kv_head=1, norm="rmsnorm", activation="swiglu", bias=False),
}


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize(
    "sampling", [dict(do_sample=False), dict(do_sample=True, seed=3, top_k=20)]
)
def test_cached_and_uncached_decoding_agree(char_tokenizer, kind, sampling):
    model = tiny_gpt(char_tokenizer.vocab_size, **MODELS[kind])
    # prompts of different lengths, so left padding is in play
    ids = char_tokenizer.encode_batch(["Pack my", "A", "The quick brown fox"])
    cached = generate_ids(
        model, ids, GenerationConfig(max_new_tokens=10, use_cache=True, **sampling)
    )
    uncached = generate_ids(
        model, ids, GenerationConfig(max_new_tokens=10, use_cache=False, **sampling)
    )
    assert cached == uncached


def test_seed_reproducibility(tiny_model, char_tokenizer):
    ids = [char_tokenizer.encode("The")]
    same = [
        generate_ids(tiny_model, ids, GenerationConfig(max_new_tokens=20, seed=11))
        for _ in range(2)
    ]
    other = generate_ids(tiny_model, ids, GenerationConfig(max_new_tokens=20, seed=12))
    assert same[0] == same[1] and same[0] != other
    # the global RNG is left alone
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    generate_ids(tiny_model, ids, GenerationConfig(max_new_tokens=5))
    assert torch.equal(torch.rand(1), before)


def test_a_sampled_row_does_not_depend_on_its_batch(tiny_model, char_tokenizer):
    """Row (prompt p, sequence j) samples from its own generator, seeded seed + j: it gets the
    tokens of prompt p alone with seed + j, whatever the other prompts (the server relies on it)."""
    ids = char_tokenizer.encode_batch(["Pack my", "A", "The quick brown fox"])
    config = GenerationConfig(max_new_tokens=10, seed=5, num_return_sequences=2, top_k=20)
    batched = generate_ids(tiny_model, ids, config)
    for r, row in enumerate(batched):
        p, j = divmod(r, 2)
        alone = GenerationConfig(max_new_tokens=10, seed=5 + j, top_k=20)
        assert row == generate_ids(tiny_model, [ids[p]], alone)[0]


def test_returned_sequences_differ_when_sampling(tiny_model, char_tokenizer):
    results, _ = run(
        tiny_model, char_tokenizer, "The", max_new_tokens=20, num_return_sequences=3, seed=0
    )
    assert len({tuple(r.token_ids) for r in results}) == 3


def test_restores_training_mode(tiny_model, char_tokenizer):
    tiny_model.train()
    generate_ids(tiny_model, [char_tokenizer.encode("The")], GenerationConfig(max_new_tokens=2))
    assert tiny_model.training


# --- stopping -----------------------------------------------------------------------------------


def test_eos_stops_and_is_left_out(bpe_tokenizer):
    eos = bpe_tokenizer.eos_id
    model = ScriptedLM(
        bpe_tokenizer.vocab_size, bpe_tokenizer.encode(" the fox") + [eos], prompt_len=1
    )
    (r,), pieces = run(model, bpe_tokenizer, "x", **GREEDY)
    assert r.finish_reason == "eos" and r.text == " the fox" and eos not in r.token_ids
    assert "".join(pieces[0]) == r.text


def test_eos_token_id_overrides_the_tokenizer(tiny_model, char_tokenizer):
    ids = [char_tokenizer.encode("The")]
    free = generate_ids(tiny_model, ids, GenerationConfig(max_new_tokens=15, **GREEDY))[0]
    eos = free[4]
    (r,), _ = run(tiny_model, char_tokenizer, "The", max_new_tokens=15, eos_token_id=eos, **GREEDY)
    assert r.finish_reason == "eos" and r.token_ids == free[: free.index(eos)]


def test_stop_string_cuts_the_text(bpe_tokenizer):
    model = scripted(bpe_tokenizer, " the lazy dog. END of it")
    (r,), pieces = run(model, bpe_tokenizer, "x", stop=["END", "never"], **GREEDY)
    assert r.finish_reason == "stop" and r.text == " the lazy dog. "
    assert bpe_tokenizer.decode(r.token_ids) == r.text  # " END" is not its own token: a clean cut
    assert "".join(pieces[0]) == r.text


def test_stop_string_inside_a_token_keeps_the_covering_ids(bpe_tokenizer):
    model = scripted(bpe_tokenizer, " the quick brown fox")
    (r,), _ = run(model, bpe_tokenizer, "x", stop=["ick"], **GREEDY)
    assert r.text == " the qu" and r.finish_reason == "stop"
    decoded = bpe_tokenizer.decode(r.token_ids)
    assert decoded.startswith(r.text) and "brown" not in decoded


def test_stop_string_on_a_real_model(tiny_model, char_tokenizer):
    (free,), _ = run(tiny_model, char_tokenizer, "The", max_new_tokens=20, **GREEDY)
    stop = free.text[6:8]
    (r,), pieces = run(tiny_model, char_tokenizer, "The", max_new_tokens=20, stop=[stop], **GREEDY)
    assert r.finish_reason == "stop" and r.text == free.text[: free.text.index(stop)]
    assert r.token_ids == free.token_ids[: len(r.text)]
    assert "".join(pieces.get(0, [])) == r.text


def test_only_the_stopped_row_finishes(bpe_tokenizer):
    model = scripted(bpe_tokenizer, " the fox. END")
    results, _ = run(model, bpe_tokenizer, ["x", "y"], stop=["END"], max_new_tokens=8, **GREEDY)
    assert [r.finish_reason for r in results] == ["stop", "stop"]


# --- streaming ----------------------------------------------------------------------------------


def test_streaming_waits_for_whole_characters(bpe_tokenizer):
    text = " the fox costs 5€ — ünïcode"
    ids = bpe_tokenizer.encode(text)
    # some characters span several byte tokens
    assert any(bpe_tokenizer.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))
    model = ScriptedLM(bpe_tokenizer.vocab_size, ids, prompt_len=1)
    (r,), pieces = run(model, bpe_tokenizer, "x", max_new_tokens=len(ids), **GREEDY)
    assert r.text == text and "".join(pieces[0]) == text
    assert not any("\ufffd" in p for p in pieces[0])
    assert len(pieces[0]) > 3  # it did stream


def test_streaming_holds_back_a_possible_stop_string(bpe_tokenizer):
    model = scripted(bpe_tokenizer, " the lazy dog. The end")
    (r,), pieces = run(model, bpe_tokenizer, "x", stop=["dog!"], **GREEDY, max_new_tokens=12)
    assert r.finish_reason == "length" and "".join(pieces[0]) == r.text
    assert not any(p.endswith("dog") for p in pieces[0])  # "dog" waited for the next character


@pytest.mark.parametrize("tokenizer", ["char_tokenizer", "bpe_tokenizer"])
def test_stream_concatenates_to_the_text(request, tokenizer):
    tokenizer = request.getfixturevalue(tokenizer)
    model = tiny_gpt(tokenizer.vocab_size)
    results, pieces = run(
        model,
        tokenizer,
        ["The", "Pack my box"],
        max_new_tokens=20,
        seed=5,
        num_return_sequences=2,
        stop=["e"],
    )
    for i, r in enumerate(results):
        assert "".join(pieces.get(i, [])) == r.text


# --- prompts and errors -------------------------------------------------------------------------


def test_empty_prompt_starts_from_eos(bpe_tokenizer):
    model = tiny_gpt(bpe_tokenizer.vocab_size)
    (r,), _ = run(model, bpe_tokenizer, "", max_new_tokens=3, seed=0)
    assert r.prompt_ids == [bpe_tokenizer.eos_id] and r.prompt == ""


def test_empty_prompt_without_eos_is_an_error(tiny_model, char_tokenizer):
    with pytest.raises(LmforgeError, match="prompt 1 is empty"):
        generate(tiny_model, char_tokenizer, ["The", ""], GenerationConfig())
    with pytest.raises(LmforgeError, match="no prompts"):
        generate(tiny_model, char_tokenizer, [], GenerationConfig())
    with pytest.raises(LmforgeError, match="prompt 0 is empty"):
        generate_ids(tiny_model, [[]], GenerationConfig())


def test_too_long_names_the_numbers(tiny_model, char_tokenizer):
    prompt = "The quick brown fox jumps over"  # 30 characters; the context is 32
    with pytest.raises(
        LmforgeError, match=r"30 tokens\) \+ max_new_tokens \(10\) = 40 tokens .* context of 32"
    ):
        generate(tiny_model, char_tokenizer, prompt, GenerationConfig(max_new_tokens=10))
    # exactly filling the context is fine
    (r,), _ = run(tiny_model, char_tokenizer, prompt, max_new_tokens=2)
    assert len(r.token_ids) == 2


def test_token_outside_the_vocabulary(tiny_model):
    with pytest.raises(LmforgeError, match="token id 999"):
        generate_ids(tiny_model, [[1, 999]], GenerationConfig())


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", 0),
        ("temperature", 0.0),
        ("top_k", 0),
        ("top_p", 1.5),
        ("top_p", 0.0),
        ("min_p", 1.0),
        ("min_p", -0.1),
        ("repetition_penalty", 0.0),
        ("no_repeat_ngram_size", -1),
        ("num_return_sequences", 0),
        ("stop", [""]),
        ("eos_token_id", -2),
        ("presence_penalty", -2.5),
        ("frequency_penalty", 3.0),
    ],
)
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(LmforgeError, match=field):
        GenerationConfig(**{field: value})


def test_config_from_strings():
    config = from_dict(GenerationConfig, {"top_p": "0.9", "stop": "END,###", "seed": "none"})
    assert config.top_p == 0.9 and config.stop == ["END", "###"] and config.seed is None
    assert GenerationConfig(stop="\n").stop == ["\n"]


def test_generation_refuses_models_that_do_not_decode():
    from lmforge.errors import LmforgeError
    from lmforge.models import EncoderDecoder, EncoderDecoderConfig
    from tests.models.test_bert import tiny_bert

    small = dict(n_layer=1, n_head=2, n_embd=16, vocab_size=32)
    for model, fragment in ((tiny_bert(vocab_size=32), "use fill-mask"),
                            (EncoderDecoder(EncoderDecoderConfig(**small)), "EncoderDecoder")):
        with pytest.raises(LmforgeError, match=f"decoder-only model.*{fragment}"):
            generate_ids(model, [[1, 2]], GenerationConfig(max_new_tokens=2))

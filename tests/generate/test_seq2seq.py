"""Encoder-decoder decoding: the same tokens and beam scores as Hugging Face T5's `generate` on the
same random weights (padded batches, greedy, sampling, beam search and its options), cached ==
uncached and batched == alone on lmforge's own Transformer and T5 styles, input validation, and
the text API `translate`.

The parity models run in float64, so that both sides hand the processors and the search the same
float32 log-probs (both cast there) and no near-tie can be flipped by rounding in the forward pass.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.generate import (
    GenerationConfig,
    generate_seq2seq_hypotheses,
    generate_seq2seq_ids,
    translate,
)
from lmforge.interop import hf_t5
from lmforge.models import EncoderDecoder, EncoderDecoderConfig
from lmforge.tokenizer import train_tokenizer
from tests.conftest import SAMPLE_TEXT, tiny_gpt

transformers = pytest.importorskip("transformers")
from transformers import T5Config, T5ForConditionalGeneration  # noqa: E402

N_NEW = 12
HF_EOS = 1  # the T5 config's eos, also the last token of every source


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer("bpe", [SAMPLE_TEXT], 300)


# --- parity with Hugging Face T5 -----------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer):
    """The same random-init weights as a transformers T5ForConditionalGeneration and, converted
    from its saved folder, an lmforge EncoderDecoder."""
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=tokenizer.vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
        dropout_rate=0.0,
        feed_forward_proj="relu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=HF_EOS,
    )
    hf = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" in name:
                p.normal_(1.0, 0.2)
        # A lm_head of its own: tied to the input table, a random T5 mostly repeats its last
        # token; untied, it gives varied continuations, so beams and penalties have choices.
        hf.lm_head.weight = torch.nn.Parameter(torch.randn(tokenizer.vocab_size, 32) * 32**-0.5)
    folder = tmp_path_factory.mktemp("hf-t5")
    hf.save_pretrained(folder)
    tokenizer.save(folder)
    model = hf_t5.load(folder).model
    assert not model.config.tie_embeddings
    return model.double(), hf.double()


@pytest.fixture(scope="module")
def sources(tokenizer):
    """Three sources of different lengths, each ending in eos as T5's do: right padding."""
    g = torch.Generator().manual_seed(1)
    return [
        torch.randint(2, tokenizer.vocab_size, (n,), generator=g).tolist() + [HF_EOS]
        for n in (7, 3, 11)
    ]


@pytest.fixture(scope="module")
def eos(pair, sources) -> dict[str, int]:
    """Tokens that greedy decoding and beam search meet a few steps in, so that rows and
    hypotheses end early: the first token of the first source's continuation (greedy, or the
    best beam) from its 4th on that is new to it."""
    model, _ = pair
    out = {}
    for search, beams in (("greedy", 1), ("beam", 3)):
        config = GenerationConfig(max_new_tokens=N_NEW, do_sample=False, num_beams=beams)
        best = generate_seq2seq_ids(model, sources[:1], config)[0]
        out[search] = next(t for i, t in enumerate(best) if i >= 3 and t not in best[:i])
    return out


def hf_generate(
    hf, sources, options: dict, **hf_only
) -> tuple[list[list[int]], list[float] | None]:
    """HF's continuations for right-padded sources, without the start token and cut before eos,
    and with beam search their scores."""
    S = max(map(len, sources))
    ids = torch.tensor([s + [0] * (S - len(s)) for s in sources])
    mask = torch.tensor([[1] * len(s) + [0] * (S - len(s)) for s in sources])
    out = hf.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=N_NEW,
        return_dict_in_generate=True,
        output_scores=True,
        **options,
        **hf_only,
    )
    eos = options.get("eos_token_id", HF_EOS)
    rows = [r[1:] for r in out.sequences.tolist()]  # HF's sequences begin with the start token
    rows = [r[: r.index(eos)] if eos in r else r for r in rows]  # HF pads finished rows after eos
    scores = out.sequences_scores.tolist() if options.get("num_beams", 1) > 1 else None
    return rows, scores


OPTIONS = {
    "greedy": dict(),
    "greedy-penalties": dict(repetition_penalty=1.3, no_repeat_ngram_size=2),
    "greedy-min-new-tokens": dict(min_new_tokens=6),
    "beams-3": dict(num_beams=3),
    "beams-4-return-3": dict(num_beams=4, num_return_sequences=3),
    "length-penalty-negative": dict(num_beams=3, length_penalty=-1.0, num_return_sequences=2),
    "length-penalty-2": dict(num_beams=4, length_penalty=2.0, num_return_sequences=4),
    "early-stopping-true": dict(num_beams=3, early_stopping=True, num_return_sequences=2),
    "early-stopping-never": dict(num_beams=3, early_stopping="never", num_return_sequences=2),
    "never-length-penalty-2": dict(num_beams=2, early_stopping="never", length_penalty=2.0),
    "no-repeat-ngram": dict(num_beams=3, no_repeat_ngram_size=2, num_return_sequences=3),
    "repetition-penalty": dict(num_beams=3, repetition_penalty=1.5, num_return_sequences=2),
    "min-new-tokens": dict(num_beams=3, min_new_tokens=6, num_return_sequences=3),
    "everything": dict(
        num_beams=4,
        num_return_sequences=4,
        repetition_penalty=1.3,
        no_repeat_ngram_size=3,
        min_new_tokens=3,
        length_penalty=1.5,
        early_stopping=True,
    ),
}


@pytest.mark.parametrize("which_eos", ["met", "model"])
@pytest.mark.parametrize("name", OPTIONS)
def test_same_tokens_and_scores_as_hf_t5(pair, sources, eos, name, which_eos):
    """ "met": an eos the search meets, so rows and hypotheses end early; "model": neither side is
    told one, so both fall back to the model config's."""
    model, hf = pair
    options = dict(OPTIONS[name], do_sample=False)
    if which_eos == "met":
        options["eos_token_id"] = eos["beam" if options.get("num_beams", 1) > 1 else "greedy"]
    config = GenerationConfig(max_new_tokens=N_NEW, **options)
    theirs, scores = hf_generate(hf, sources, options)
    assert generate_seq2seq_ids(model, sources, config) == theirs
    if config.num_beams > 1:
        hyps = generate_seq2seq_hypotheses(model, sources, config)
        assert [h.tokens for h in hyps] == theirs
        torch.testing.assert_close(
            torch.tensor([h.score for h in hyps]), torch.tensor(scores), rtol=1e-5, atol=1e-5
        )


def test_parity_cases_end_early_and_run_to_length(pair, sources, eos):
    """The eos the parity cases use does end some rows early while others run to max_new_tokens."""
    model, _ = pair
    config = GenerationConfig(
        max_new_tokens=N_NEW,
        do_sample=False,
        num_beams=4,
        num_return_sequences=4,
        eos_token_id=eos["beam"],
    )
    hyps = generate_seq2seq_hypotheses(model, sources, config)
    assert {h.finish_reason for h in hyps} == {"eos", "length"}
    config = GenerationConfig(max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos["greedy"])
    assert {len(ids) < N_NEW for ids in generate_seq2seq_ids(model, sources, config)} == {
        True,
        False,
    }


def test_min_new_tokens_allow_eos_right_after_them(pair, sources, eos):
    """The first source ends at eos after `natural` tokens: min_new_tokens=natural changes
    nothing for it, natural + 1 holds eos back one step; HF agrees on both."""
    model, hf = pair
    options = dict(do_sample=False, eos_token_id=eos["greedy"])
    natural = len(
        generate_seq2seq_ids(model, sources[:1], GenerationConfig(max_new_tokens=N_NEW, **options))[
            0
        ]
    )
    assert natural < N_NEW
    for min_new in (natural, natural + 1):
        ours = generate_seq2seq_ids(
            model,
            sources,
            GenerationConfig(max_new_tokens=N_NEW, min_new_tokens=min_new, **options),
        )
        assert ours == hf_generate(hf, sources, dict(options, min_new_tokens=min_new))[0]
        assert (len(ours[0]) == natural) == (min_new == natural)


@pytest.mark.parametrize("search", [dict(), dict(num_beams=3)], ids=["greedy", "beams"])
def test_penalties_see_the_start_token(pair, sources, monkeypatch, search):
    """HF's processors read the decoder's tokens from the start token on. With a start token the
    model likes to produce (the most frequent of its greedy output), that shows: the repetition
    penalty holds it back from the first step, and the n-gram ban counts n-grams that begin with it."""
    model, hf = pair
    greedy = generate_seq2seq_ids(
        model, sources, GenerationConfig(max_new_tokens=N_NEW, do_sample=False)
    )
    tokens = [t for ids in greedy for t in ids]
    start = max(set(tokens), key=tokens.count)
    monkeypatch.setattr(model.config, "decoder_start_token_id", start)
    for penalty in (dict(repetition_penalty=2.0), dict(no_repeat_ngram_size=2)):
        options = dict(do_sample=False, **search, **penalty)
        theirs, _ = hf_generate(hf, sources, options, decoder_start_token_id=start)
        assert (
            generate_seq2seq_ids(model, sources, GenerationConfig(max_new_tokens=N_NEW, **options))
            == theirs
        )


@pytest.mark.parametrize(
    "options",
    [
        dict(top_k=20, temperature=0.8, seed=3),
        dict(repetition_penalty=1.2, no_repeat_ngram_size=2, top_p=0.9, seed=5),
    ],
    ids=["top-k", "penalties-top-p"],
)
def test_sampling_matches_hf_t5(pair, sources, eos, options):
    model, hf = pair
    options = dict(options)
    seed = options.pop("seed")
    config = GenerationConfig(
        max_new_tokens=N_NEW, do_sample=True, seed=seed, eos_token_id=eos["greedy"], **options
    )
    # HF draws for finished rows too, we do not: rows part ways once one ends, so one source at a time
    for source in sources:
        torch.manual_seed(
            seed
        )  # HF samples from the global RNG; ours from a generator with this seed
        theirs, _ = hf_generate(
            hf,
            [source],
            dict(
                options,
                do_sample=True,
                top_k=options.get("top_k", 0),
                eos_token_id=config.eos_token_id,
            ),
        )
        assert generate_seq2seq_ids(model, [source], config) == theirs


# --- lmforge's own styles: cache, padding, num_return_sequences ---------------------------------
STYLES = {
    # the original Transformer: post-LN LayerNorm, sinusoids, scaled embeddings
    "transformer": dict(),
    # T5: pre-norm RMSNorm, relative position bias, no biases, unscaled attention
    "t5": dict(
        norm="rmsnorm",
        norm_position="pre",
        bias=False,
        position="relative",
        relative_buckets=8,
        relative_max_distance=12,
        scale_embeddings=False,
        scale_attn=False,
    ),
}
SOURCES = [[5, 6, 7, 8, 9, 1], [10, 11, 1], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1]]
SEARCHES = {
    "greedy": dict(),
    "greedy-penalties": dict(repetition_penalty=1.4, no_repeat_ngram_size=2, min_new_tokens=2),
    "beams": dict(num_beams=3, num_return_sequences=3),
    "beams-penalties": dict(
        num_beams=4,
        num_return_sequences=2,
        repetition_penalty=1.4,
        no_repeat_ngram_size=2,
        min_new_tokens=2,
        early_stopping="never",
        length_penalty=0.5,
    ),
}


def tiny_encdec(style: str, **overrides) -> EncoderDecoder:
    torch.manual_seed(0)
    config = dict(
        vocab_size=64,
        n_layer=2,
        n_head=2,
        n_embd=32,
        mlp_hidden=64,
        max_position=32,
        dropout=0.0,
        tie_embeddings=False,
        eos_token_id=1,
        **STYLES[style],
    )
    return EncoderDecoder(EncoderDecoderConfig(**{**config, **overrides})).double().eval()


def met_eos(model: EncoderDecoder, search: dict) -> int:
    """A token the search meets a few steps in: an eos that ends rows early. The first token,
    from the 3rd on, of any source's continuation that is new to it."""
    config = GenerationConfig(max_new_tokens=10, do_sample=False, **search)
    outputs = generate_seq2seq_ids(model, SOURCES, config)
    return next(t for ids in outputs for i, t in enumerate(ids) if i >= 2 and t not in ids[:i])


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("style", STYLES)
def test_cached_and_uncached_agree(style, search):
    model = tiny_encdec(style)
    options = dict(
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=met_eos(model, SEARCHES[search]),
        **SEARCHES[search],
    )
    cached = generate_seq2seq_ids(model, SOURCES, GenerationConfig(use_cache=True, **options))
    uncached = generate_seq2seq_ids(model, SOURCES, GenerationConfig(use_cache=False, **options))
    assert cached == uncached
    if (
        "num_beams" not in SEARCHES[search]
    ):  # beam search may keep longer hypotheses than those ending in eos
        assert min(map(len, cached)) < 10  # rows ended at eos, and the rest ran on without them


@pytest.mark.parametrize("search", ["greedy", "beams-penalties"])
@pytest.mark.parametrize("style", STYLES)
def test_batched_sources_match_each_source_alone(style, search):
    """A source's decoding is its own: its batch neighbours and their padding change nothing."""
    model = tiny_encdec(style)
    config = GenerationConfig(
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=met_eos(model, SEARCHES[search]),
        **SEARCHES[search],
    )
    alone = [ids for source in SOURCES for ids in generate_seq2seq_ids(model, [source], config)]
    assert generate_seq2seq_ids(model, SOURCES, config) == alone


def test_num_return_sequences_when_sampling():
    """Sources are repeated, each copy drawn on its own; greedy copies are all the same."""
    model = tiny_encdec("t5")
    sampled = generate_seq2seq_ids(
        model, SOURCES[:2], GenerationConfig(max_new_tokens=8, seed=0, num_return_sequences=3)
    )
    assert len(sampled) == 6 and len({tuple(ids) for ids in sampled[:3]}) > 1
    greedy = generate_seq2seq_ids(
        model,
        SOURCES[:2],
        GenerationConfig(max_new_tokens=8, do_sample=False, num_return_sequences=2),
    )
    assert greedy == [
        ids
        for ids in generate_seq2seq_ids(
            model, SOURCES[:2], GenerationConfig(max_new_tokens=8, do_sample=False)
        )
        for _ in range(2)
    ]


def test_restores_training_mode_and_relative_positions_have_no_end():
    model = tiny_encdec("t5").train()
    # max_position (32) does not bound T5's relative positions
    out = generate_seq2seq_ids(
        model,
        [list(range(2, 42))],
        GenerationConfig(max_new_tokens=40, do_sample=False, eos_token_id=0),
    )
    assert model.training
    assert len(out[0]) == 40


# --- validation ----------------------------------------------------------------------------------
GREEDY = GenerationConfig(max_new_tokens=5, do_sample=False)


@pytest.mark.parametrize(
    "style, sources, config, kwargs, message",
    [
        ("t5", [], GREEDY, {}, "no sources given"),
        ("t5", [[3, 1], []], GREEDY, {}, "source 1 is empty"),
        (
            "t5",
            [[3, 64, 1]],
            GREEDY,
            {},
            r"source 0 has token id 64, outside the model's vocabulary \[0, 64\)",
        ),
        ("t5", [[-1, 1]], GREEDY, {}, r"token id -1, outside the model's vocabulary \[0, 64\)"),
        (
            "transformer",
            [[3] * 33],
            GREEDY,
            {},
            "source 0 has 33 tokens, more than the model's 32 positions",
        ),
        (
            "t5",
            [[3, 1], [3] * 9],
            GREEDY,
            dict(max_source_length=8),
            "source 1 has 9 tokens, more than max_source_length=8",
        ),
        ("t5", [[3, 1]], GREEDY, dict(max_source_length=0), "max_source_length must be >= 1"),
        (
            "transformer",
            [[3, 1]],
            GenerationConfig(max_new_tokens=32, do_sample=False),
            {},
            r"max_new_tokens \(32\) \+ the decoder start token = 33 tokens exceeds the model's 32 positions.*at most 31",
        ),
    ],
    ids=[
        "no-sources",
        "empty",
        "vocab",
        "negative",
        "too-long",
        "max-source-length",
        "bad-max-source-length",
        "max-new-tokens",
    ],
)
def test_bad_inputs_are_refused(style, sources, config, kwargs, message):
    with pytest.raises(LmforgeError, match=message):
        generate_seq2seq_ids(tiny_encdec(style), sources, config, **kwargs)


def test_beam_search_is_refused_the_same_way():
    model = tiny_encdec("transformer")
    with pytest.raises(LmforgeError, match="source 0 has 33 tokens"):
        generate_seq2seq_ids(
            model, [[3] * 33], GenerationConfig(max_new_tokens=5, do_sample=False, num_beams=2)
        )
    with pytest.raises(LmforgeError, match="set num_beams > 1"):
        generate_seq2seq_hypotheses(model, [[3, 1]], GREEDY)


def test_a_decoder_only_model_is_refused(tokenizer):
    with pytest.raises(
        LmforgeError, match="needs an encoder-decoder model.*this is a GPT.*use generate"
    ):
        generate_seq2seq_ids(tiny_gpt(), [[3, 1]], GREEDY)
    with pytest.raises(LmforgeError, match="needs an encoder-decoder model"):
        translate(tiny_gpt(), tokenizer, "hi", GREEDY)


# --- text ----------------------------------------------------------------------------------------
TEXTS = [
    "The quick brown fox jumps.",
    "Pack",
    "How vexingly quick daft zebras jump!",
    "A model",
    "dozen",
]


@pytest.fixture(scope="module")
def text_model(tokenizer):
    """No eos of its own: translate takes the tokenizer's."""
    torch.manual_seed(0)
    config = EncoderDecoderConfig(
        vocab_size=tokenizer.vocab_size,
        n_layer=2,
        n_head=2,
        n_embd=32,
        mlp_hidden=64,
        dropout=0.0,
        tie_embeddings=False,
        eos_token_id=None,
        **STYLES["t5"],
    )
    return EncoderDecoder(config).eval()


@pytest.mark.parametrize(
    "search", [dict(), dict(num_beams=3, num_return_sequences=2)], ids=["greedy", "beams"]
)
def test_translate_keeps_input_order_in_small_sorted_batches(text_model, tokenizer, search):
    config = GenerationConfig(max_new_tokens=8, do_sample=False, **search)
    n = config.num_return_sequences
    results = translate(text_model, tokenizer, TEXTS, config, batch_size=2)
    eos = tokenizer.eos_id
    sources = [tokenizer.encode(t) + [eos] for t in TEXTS]
    assert [r.prompt for r in results] == [t for t in TEXTS for _ in range(n)]
    assert [r.prompt_ids for r in results] == [s for s in sources for _ in range(n)]
    # the same tokens as the whole list in one batch, with the tokenizer's eos ending the targets
    expected = generate_seq2seq_ids(
        text_model, sources, dataclasses.replace(config, eos_token_id=eos)
    )
    assert [r.token_ids for r in results] == expected
    for r in results:
        assert r.text == tokenizer.decode(r.token_ids, skip_special_tokens=True)
        assert r.finish_reason == ("length" if len(r.token_ids) == 8 else "eos")


def test_translate_finishes_at_eos_and_at_stop_strings(text_model, tokenizer):
    greedy = GenerationConfig(max_new_tokens=8, do_sample=False)
    free = translate(text_model, tokenizer, TEXTS, greedy)
    ids = free[0].token_ids
    eos = next(t for i, t in enumerate(ids) if i >= 2 and t not in ids[:i])
    ended = translate(
        text_model,
        tokenizer,
        TEXTS[0],
        GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=eos),
    )[0]
    assert (ended.token_ids, ended.finish_reason) == (ids[: ids.index(eos)], "eos")

    # a stop string from the middle of the text: the text ends before it (beam search cuts the
    # chosen hypothesis)
    for search in (dict(), dict(num_beams=2)):
        config = GenerationConfig(max_new_tokens=8, do_sample=False, **search)
        full = translate(text_model, tokenizer, TEXTS[2], config)[0].text
        stop = next(
            full[i : i + 2]
            for i in range(len(full) // 2, len(full) - 1)
            if "\ufffd" not in full[i : i + 2]
        )
        cut = translate(text_model, tokenizer, TEXTS[2], dataclasses.replace(config, stop=[stop]))[
            0
        ]
        assert (cut.text, cut.finish_reason) == (full[: full.find(stop)], "stop")
        assert tokenizer.decode(cut.token_ids).startswith(cut.text)


def test_translate_refuses_bad_arguments(text_model, tokenizer):
    with pytest.raises(LmforgeError, match="no texts given"):
        translate(text_model, tokenizer, [], GREEDY)
    with pytest.raises(LmforgeError, match="batch_size must be >= 1, got 0"):
        translate(text_model, tokenizer, "Pack", GREEDY, batch_size=0)
    with pytest.raises(LmforgeError, match="source 1 has .* tokens, more than max_source_length=3"):
        translate(
            text_model,
            tokenizer,
            ["Pack", "How vexingly quick daft zebras jump!"],
            GREEDY,
            max_source_length=3,
        )


def test_a_sampled_source_does_not_depend_on_its_batch():
    """Each row samples from its own generator (seed + its index among its source's rows), so a
    source sampled inside a padded batch gets the tokens it gets alone, as decoder-only sampling."""
    model = tiny_encdec("transformer")
    config = GenerationConfig(max_new_tokens=8, seed=11, num_return_sequences=2, top_k=20,
                              presence_penalty=0.5)
    together = generate_seq2seq_ids(model, SOURCES[:3], config)
    for i, source in enumerate(SOURCES[:3]):
        assert generate_seq2seq_ids(model, [source], config) == together[2 * i : 2 * i + 2]

"""Encoder (BERT) checkpoints served: /v1/embeddings through the official client, /v1/classify,
/v1/fill-mask, with the results of the offline functions and OpenAI-shaped errors."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import torch

from lmforge.checkpoint import Checkpoint
from lmforge.encoders import embed, fill_mask
from lmforge.models.bert import Bert, BertConfig
from lmforge.predict import predict
from lmforge.serve.app import create_app
from lmforge.tokenizer import train_tokenizer
from tests.serve.test_app import serving

openai = pytest.importorskip("openai")
TEXTS = ["alice went to new york city today", "bob saw a film", "the quick brown fox"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer("wordpiece", TEXTS * 3, vocab_size=80)


def bert(tokenizer, head, **kw) -> Checkpoint:
    torch.manual_seed(0)
    config = BertConfig(n_layer=1, n_head=2, n_embd=16, max_position=32, vocab_size=tokenizer.vocab_size,
                        head=head, **kw)
    return Checkpoint(model=Bert(config).eval(), tokenizer=tokenizer)


def test_embeddings_match_offline_and_decode_from_base64(tokenizer):
    ckpt = bert(tokenizer, "none")
    with serving(create_app(ckpt, model_name="enc")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        out = client.embeddings.create(model="enc", input=TEXTS)
        expected = embed(ckpt.model, tokenizer, TEXTS).numpy()
        got = np.array([d.embedding for d in out.data])
        assert [d.index for d in out.data] == [0, 1, 2]
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert out.usage.prompt_tokens == sum(len(ids) + 2 for ids in tokenizer.encode_batch(TEXTS))
        raw = httpx.post(f"{url}/v1/embeddings", json={"model": "enc", "input": TEXTS[0],
                                                       "encoding_format": "base64"}).json()
        vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
        np.testing.assert_allclose(vector, expected[0], atol=1e-6)
        for body, status, param in (({"input": []}, 422, "input"), ({"input": ""}, 422, "input"),
                                    ({"input": "x", "dimensions": 8}, 400, "dimensions"),
                                    ({"input": "x", "model": "other"}, 404, "model")):
            r = httpx.post(f"{url}/v1/embeddings", json={"model": "enc", **body})
            assert r.status_code == status and r.json()["error"]["param"] == param, r.text
        r = httpx.post(f"{url}/v1/completions", json={"model": "enc", "prompt": "hi"})
        assert r.status_code == 400 and "encoder" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/classify", json={"model": "enc", "input": "hi"})
        assert r.status_code == 400 and "classification head" in r.json()["error"]["message"]


def test_classify_and_fill_mask(tokenizer):
    clf = bert(tokenizer, "classification", num_labels=3, labels=["neg", "neu", "pos"])
    with serving(create_app(clf, model_name="clf")) as url:
        r = httpx.post(f"{url}/v1/classify", json={"model": "clf", "input": TEXTS}).json()
        expected = predict(clf.model, tokenizer, TEXTS)
        for got, want in zip(r["data"], expected):
            assert got["label"] == want["label"]
            assert got["scores"] == pytest.approx(want["scores"], abs=1e-5)
    mlm = bert(tokenizer, "mlm")
    with serving(create_app(mlm, model_name="mlm")) as url:
        text = "bob saw a [MASK]"
        r = httpx.post(f"{url}/v1/fill-mask", json={"model": "mlm", "input": text, "top_k": 3}).json()
        want = fill_mask(mlm.model, tokenizer, text, top_k=3)
        assert [c["token"] for c in r["data"][0]["masks"][0]] == [c["token"] for c in want[0]]
        r = httpx.post(f"{url}/v1/fill-mask", json={"model": "mlm", "input": "no mask here"})
        assert r.status_code == 400 and "[MASK]" in r.json()["error"]["message"]


def test_an_encoder_decoder_translates_through_completions(tmp_path):
    from lmforge.data import PrepareConfig, open_data, prepare
    from lmforge.generate import GenerationConfig, translate
    from lmforge.models import ENCDEC_PRESETS, EncoderDecoder, EncoderDecoderConfig
    from tests.data.test_parallel import toy_pairs, write_aligned

    src, tgt = write_aligned(tmp_path, toy_pairs(100))
    prepare(PrepareConfig(source=str(src), target=str(tgt), vocab_size=300), tmp_path / "d", progress=False)
    tok = open_data(tmp_path / "d").tokenizer
    torch.manual_seed(0)
    config = EncoderDecoderConfig(**{**ENCDEC_PRESETS["t5-tiny"], "n_layer": 1, "n_head": 2, "n_embd": 32,
                                     "mlp_hidden": 64, "vocab_size": tok.vocab_size, "eos_token_id": tok.eos_id})
    ckpt = Checkpoint(model=EncoderDecoder(config).eval(), tokenizer=tok)
    with serving(create_app(ckpt, model_name="mt")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        out = client.completions.create(model="mt", prompt="ein hund", max_tokens=6, temperature=0)
        [want] = translate(ckpt.model, tok, "ein hund", GenerationConfig(do_sample=False, max_new_tokens=6))
        assert out.choices[0].text == want.text and out.usage.prompt_tokens == len(want.prompt_ids)
        stream = client.completions.create(model="mt", prompt="ein hund", max_tokens=6, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream) == want.text
        sampled = client.completions.create(model="mt", prompt="ein hund", max_tokens=6, n=2, seed=4)
        offline = translate(ckpt.model, tok, "ein hund", GenerationConfig(max_new_tokens=6, seed=4,
                                                                          num_return_sequences=2))
        assert [c.text for c in sampled.choices] == [o.text for o in offline]
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "mt", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400 and "encoder-decoder" in r.json()["error"]["message"]

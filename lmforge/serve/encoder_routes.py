"""Routes for encoder (BERT) checkpoints: OpenAI's `/v1/embeddings`, and `/v1/classify` (vLLM's
shape) and `/v1/fill-mask` for task heads.

- embeddings: mean-pooled, L2-normalised last hidden states (`lmforge.encoders.embed`, the
  sentence-transformers recipe), as float lists or base64 of little-endian float32, as OpenAI
  encodes them; usage counts the tokens the encoder read, [CLS]/[SEP] included;
- classify: a fine-tuned checkpoint's label and probabilities per input (classification), or the
  entities it tags (token classification), as `lmforge predict` gives them;
- fill-mask: the top tokens for each [MASK] of each input (a masked-LM head).

The model runs in a worker thread (never on the event loop), one request at a time: a forward
pass already uses every core.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI
from pydantic import Field, field_validator

from lmforge.checkpoint import Checkpoint
from lmforge.errors import LmforgeError
from lmforge.serve.protocol import APIError, ServerLimits, _Strict, check_model

MAX_INPUTS = 256  # texts per request


class _EncoderRequest(_Strict):
    model: str
    input: str | list[str]
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, v: str | list[str]) -> str | list[str]:
        texts = [v] if isinstance(v, str) else v
        if not texts:
            raise ValueError("input is empty: give a string or a list of strings")
        if len(texts) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs per request, got {len(texts)}")
        if not all(t.strip() for t in texts):
            raise ValueError("every input must be a non-empty string")
        return v

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingRequest(_EncoderRequest):
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


class ClassifyRequest(_EncoderRequest):
    pass


class FillMaskRequest(_EncoderRequest):
    top_k: int = Field(5, ge=1, le=50)


def add_encoder_routes(app: FastAPI, ckpt: Checkpoint, name: str, limits: ServerLimits, created: int) -> None:
    model, tokenizer = ckpt.model, ckpt.tokenizer
    head, width = model.config.head, model.config.n_embd
    lock = threading.Lock()

    async def run(fn, *args, **kwargs) -> Any:
        def locked():
            with lock:
                return fn(*args, **kwargs)

        try:
            return await asyncio.to_thread(locked)
        except LmforgeError as e:
            raise APIError(400, str(e), param="input") from e

    def check(body: _EncoderRequest) -> list[str]:
        check_model(body.model, [name])
        texts = body.texts
        chars = sum(map(len, texts))
        if chars > limits.max_prompt_chars:
            raise APIError(413, f"the input has {chars} characters, more than this server's "
                                f"limit of {limits.max_prompt_chars}", param="input")
        return texts

    def usage(texts: list[str]) -> dict:
        limit = model.config.max_position
        n = sum(min(len(ids) + 2, limit) for ids in tokenizer.encode_batch(texts))  # + [CLS] [SEP]
        return {"prompt_tokens": n, "total_tokens": n}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": created, "owned_by": "lmforge",
            "max_model_len": model.config.max_position,
        }]}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict:
        from lmforge.encoders import embed

        texts = check(body)
        if body.dimensions is not None and body.dimensions != width:
            raise APIError(400, f"this model's embeddings have {width} dimensions; it cannot "
                                f"shorten them to {body.dimensions}", param="dimensions")
        vectors = (await run(embed, model, tokenizer, texts)).numpy()  # (N, C)
        data = []
        for i, v in enumerate(vectors):
            value = (base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                     else v.astype(np.float64).tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": name, "usage": usage(texts)}

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict:
        from lmforge.predict import predict

        texts = check(body)
        if head not in ("classification", "token-classification"):
            raise APIError(400, f"this checkpoint has no classification head (head {head!r}); "
                                "fine-tune one with `lmforge finetune`", param="model")
        results = await run(predict, model, tokenizer, texts)
        return {"object": "list", "model": name, "usage": usage(texts),
                "data": [{"index": i, **r} for i, r in enumerate(results)]}

    @app.post("/v1/fill-mask")
    async def fill_mask_route(body: FillMaskRequest) -> dict:
        from lmforge.encoders import fill_mask

        texts = check(body)
        if head not in ("mlm", "pretraining"):
            raise APIError(400, f"this checkpoint has no masked-LM head (head {head!r})", param="model")
        results = [await run(fill_mask, model, tokenizer, t, body.top_k) for t in texts]
        return {"object": "list", "model": name, "usage": usage(texts),
                "data": [{"index": i, "masks": r} for i, r in enumerate(results)]}

    @app.post("/v1/completions")
    @app.post("/v1/chat/completions")
    async def not_generative() -> None:
        raise APIError(400, "this is an encoder (BERT) checkpoint: it serves /v1/embeddings, "
                            "/v1/classify and /v1/fill-mask, not text generation", param="model")

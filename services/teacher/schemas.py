"""Typed request and response bodies of the v1 API (they make the OpenAPI schema)."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)

from services.teacher.engines.types import MIN_SCORE_TEMPERATURE


def _whole(value):
    """2.0 -> 2: JSON Schema counts a number with no fractional part as an integer (and so do generated
    clients and fuzzers); 2.5, true and "2" stay refused."""
    return int(value) if type(value) is float and value.is_integer() else value


Int = Annotated[StrictInt, BeforeValidator(_whole)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ScoreRequest(_Strict):
    sequences: list[list[Int]] = Field(
        # no static maxItems: the limit is the service's --max-sequences (/v1/info `limits.max_sequences`)
        description="token id sequences to score (at most the service's --max-sequences, /v1/info limits)",
        min_length=1,
    )
    start: Int | list[Int] = Field(
        1, description="first position to score (>= 1), one for all sequences or one per sequence"
    )
    top_k: Int = Field(0, ge=0, description="teacher top-k ids and log-probs at each scored position")
    temperature: StrictFloat | StrictInt = Field(
        1.0,
        ge=MIN_SCORE_TEMPERATURE,
        le=100,
        description="log-probs and top-k of softmax(logits / temperature) (/v1/info score_temperature)",
    )


class ContinueRequest(_Strict):
    prefixes: list[list[Int]] = Field(description="token id prefixes to continue", min_length=1)
    max_tokens: Int = Field(ge=1, description="most tokens to generate per prefix")
    temperature: StrictFloat | StrictInt = Field(1.0, ge=0, le=100, description="0 is greedy")
    top_p: StrictFloat | StrictInt = Field(1.0, gt=0, le=1)
    seed: Int | None = Field(None, ge=0, le=2**63 - 1)
    stop_ids: list[Int] = Field(
        default_factory=list, description="ids that end a continuation, besides the model's own (/v1/info stop_ids)"
    )
    top_k: Int = Field(0, ge=0)


class ScoreResult(BaseModel):
    logprobs: list[float] = Field(description="log p_T(seq[start+i] | seq[:start+i])")
    top_ids: list[list[int]] = Field(description="top-k ids at each scored position, by log-prob")
    top_logprobs: list[list[float]]


class ContinueResult(BaseModel):
    token_ids: list[int]
    logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    tokens: int
    sequences: int
    generated_tokens: int = 0


class ScoreResponse(BaseModel):
    results: list[ScoreResult]
    usage: Usage


class ContinueResponse(BaseModel):
    results: list[ContinueResult]
    usage: Usage


class Info(BaseModel):
    model: str
    engine: str
    dtype: str
    vocab_size: int = Field(
        description="the model's embedding rows: ids below it are valid (the tokenizer may be shorter)"
    )
    max_model_len: int
    max_top_k: int
    eos_id: int | None = Field(description="the model config's eos id (the first when it has several)")
    stop_ids: list[int] = Field(
        description="every id that ends a continuation: the tokenizer's eos and the eos_token_id of "
        "generation_config.json and of the model config, sorted"
    )
    tokenizer_sha256: str
    chat_template_sha256: str | None
    score_temperature: bool = Field(
        True, description="whether scoring takes a `temperature` other than 1 (/v1/score, /v1/completions)"
    )
    protocol: int
    limits: dict[str, int]


# ---- the OpenAI-compatible subset (vLLM's /v1/completions shape), for other trainers ------------------


class CompletionRequest(_Strict):
    """The fields of vLLM's completions request that teacher scoring uses; any other field is refused."""

    model: StrictStr | None = Field(None, description="the id /v1/models lists (optional)")
    prompt: list[Int] | list[list[Int]] = Field(description="token ids: one prompt, or a list of prompts", min_length=1)
    max_tokens: Int = Field(
        ge=0, le=1, description="0 (with echo: the prompt's log-probs only) or 1; longer drafts: /v1/continue"
    )
    echo: StrictBool = Field(False, description="return the prompt's tokens and log-probs in `logprobs`")
    logprobs: Int | None = Field(None, ge=0, description="top log-probs per returned token (plus its own)")
    prompt_logprobs: Int | None = Field(None, ge=0, description="top log-probs per prompt position (vLLM)")
    temperature: StrictFloat | StrictInt | None = Field(
        1.0, ge=0, le=100, description="for the token generated, and the prompt log-probs' (0: those at 1)"
    )
    top_p: StrictFloat | StrictInt | None = Field(1.0, gt=0, le=1)
    seed: Int | None = Field(None, ge=0, le=2**63 - 1)
    n: Int | None = Field(1, ge=1, le=1, description="one completion per prompt")
    stream: StrictBool | None = Field(False, description="streaming is not offered")
    user: StrictStr | None = Field(None, max_length=256, description="ignored")
    return_tokens_as_token_ids: StrictBool | None = Field(
        None, description="ignored: tokens are always `token_id:<id>` (this teacher never detokenises)"
    )

    @field_validator("prompt", mode="before")
    @classmethod
    def _ids_only(cls, value):
        if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], str)):
            raise ValueError("this teacher takes token ids, not text: send `prompt` as a list of ids, or of id lists")
        return value

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, value):
        if value:
            raise ValueError("streaming is not offered: send stream false")
        return value


class CompletionLogprobs(BaseModel):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str] = Field(description="`token_id:<id>` for each token")
    top_logprobs: list[dict[str, float] | None]


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None = Field(description="1 for the most likely token (the count of tokens at least as likely)")
    decoded_token: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str = Field(description="empty: this teacher never detokenises")
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


# ---- the loaded model's limits, stated in the OpenAPI document ------------------------------------------


def _ids(vocab_size: int) -> dict:
    return {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}


def _id_lists(count: int, shortest: int, longest: int, vocab_size: int) -> dict:
    """At most `count` lists of `shortest`..`longest` token ids."""
    inner = {"type": "array", "minItems": shortest, "maxItems": longest, "items": _ids(vocab_size)}
    return {"type": "array", "minItems": 1, "maxItems": count, "items": inner}


def _optional(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _number(low: float, high: float, low_exclusive: bool = False) -> dict:
    """A float or an int in [low, high] (or (low, high]): pydantic leaves the bounds of a union out."""
    bound = {"exclusiveMinimum": low} if low_exclusive else {"minimum": low}
    return {"anyOf": [{"type": "number", **bound, "maximum": high}, {"type": "integer", **bound, "maximum": high}]}


def _limit_fields(component: dict, fields: dict[str, dict], note: str) -> None:
    """Replace each field's type with `fields[name]`, keeping its title, description and default."""
    props = component["properties"]
    for name, schema in fields.items():
        kept = {k: v for k, v in props[name].items() if k in ("title", "description", "default")}
        props[name] = {**schema, **kept}
    component["description"] = " ".join(filter(None, (component.get("description"), note)))


def state_limits(openapi: dict, info, settings) -> dict:
    """The OpenAPI document with the checks of `inputs.py` and `completions.py` for this model and these
    limits stated in it, where JSON Schema can say them: ids in [0, vocab_size), per-sequence and
    per-request lengths, top-k at most max_top_k. With V = vocab_size, M = max_model_len, R =
    max_request_tokens, S = max_sequences, the per-item bounds the request-token limit implies are folded in
    (a score sequence has >= 2 tokens, so at most R // 2 of them fit); what cannot be said per item (tokens
    summed over the request, start < len(sequence), max_tokens 0 only with echo) is in the descriptions."""
    out = json.loads(json.dumps(openapi))  # a copy, never the generated one
    comps = out["components"]["schemas"]
    vocab, tokens, count = info.vocab_size, settings.max_request_tokens, settings.max_sequences
    scored = min(info.max_model_len - 1, tokens)  # one position of headroom for the engines
    top_k = {"type": "integer", "minimum": 0, "maximum": settings.max_top_k}
    total = (
        f"At most {tokens} tokens summed over the request (--max-request-tokens) and a body of at most "
        f"{settings.max_body_bytes} bytes; token ids below the vocabulary size {vocab}."
    )
    start = {"type": "integer", "minimum": 1, "maximum": scored - 1}
    score_count = min(count, tokens // 2)
    _limit_fields(
        comps["ScoreRequest"],
        {
            "sequences": _id_lists(score_count, 2, scored, vocab),
            "start": {"anyOf": [start, {"type": "array", "minItems": 1, "maxItems": score_count, "items": start}]},
            "top_k": top_k,
            "temperature": _number(MIN_SCORE_TEMPERATURE, 100),
        },
        f"{total} Each start must be below its sequence's length, and a list of starts has one per sequence.",
    )
    prefix = min(info.max_model_len - 1, tokens)  # max_tokens >= 1 fits after it
    _limit_fields(
        comps["ContinueRequest"],
        {
            "prefixes": _id_lists(min(count, tokens), 1, prefix, vocab),
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": info.max_model_len - 1},
            "temperature": _number(0, 100),
            "top_p": _number(0, 1, low_exclusive=True),
            "seed": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 2**63 - 1}, {"type": "null"}]},
            "stop_ids": {"type": "array", "items": _ids(vocab)},
            "top_k": top_k,
        },
        f"{total} Each prefix plus max_tokens is at most max_model_len {info.max_model_len}.",
    )
    one_prompt = {"type": "array", "minItems": 1, "maxItems": scored, "items": _ids(vocab)}
    prompts = _id_lists(min(count, tokens), 1, scored, vocab)
    _limit_fields(
        comps["CompletionRequest"],
        {
            "model": _optional({"type": "string", "enum": [info.model]}),
            "prompt": {"anyOf": [one_prompt, prompts]},
            "logprobs": _optional(top_k),
            "prompt_logprobs": _optional(top_k),
            "temperature": _optional(_number(0, 100)),
            "top_p": _optional(_number(0, 1, low_exclusive=True)),
            "seed": _optional({"type": "integer", "minimum": 0, "maximum": 2**63 - 1}),
            "stream": _optional({"type": "boolean", "enum": [False]}),
            "n": _optional({"type": "integer", "minimum": 1, "maximum": 1}),
        },
        f"{total} max_tokens 0 needs echo true.",
    )
    return out

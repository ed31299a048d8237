"""Typed request and response bodies of the v1 API (they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ScoreRequest(_Strict):
    sequences: list[list[StrictInt]] = Field(
        description="token id sequences to score", min_length=1, json_schema_extra={"maxItems": 4096}
    )
    start: StrictInt | list[StrictInt] = Field(
        1, description="first position to score (>= 1), one for all sequences or one per sequence"
    )
    top_k: StrictInt = Field(0, ge=0, description="teacher top-k ids and log-probs at each scored position")


class ContinueRequest(_Strict):
    prefixes: list[list[StrictInt]] = Field(description="token id prefixes to continue", min_length=1)
    max_tokens: StrictInt = Field(ge=1, description="most tokens to generate per prefix")
    temperature: StrictFloat | StrictInt = Field(1.0, ge=0, le=100, description="0 is greedy")
    top_p: StrictFloat | StrictInt = Field(1.0, gt=0, le=1)
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    stop_ids: list[StrictInt] = Field(
        default_factory=list, description="ids that end a continuation, besides the model's own (/v1/info stop_ids)"
    )
    top_k: StrictInt = Field(0, ge=0)


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
    protocol: int
    limits: dict[str, int]


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail

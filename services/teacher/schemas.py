"""Typed request and response bodies of the v1 API (they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ScoreRequest(_Strict):
    sequences: list[list[StrictInt]] = Field(
        # no static maxItems: the limit is the service's --max-sequences (/v1/info `limits.max_sequences`)
        description="token id sequences to score (at most the service's --max-sequences, /v1/info limits)",
        min_length=1,
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


# ---- the OpenAI-compatible subset (vLLM's /v1/completions shape), for other trainers ------------------


class CompletionRequest(_Strict):
    """The fields of vLLM's completions request that teacher scoring uses; any other field is refused."""

    model: StrictStr | None = Field(None, description="the id /v1/models lists (optional)")
    prompt: list[StrictInt] | list[list[StrictInt]] = Field(
        description="token ids: one prompt, or a list of prompts", min_length=1
    )
    max_tokens: StrictInt = Field(
        ge=0, le=1, description="0 (with echo: the prompt's log-probs only) or 1; longer drafts: /v1/continue"
    )
    echo: StrictBool = Field(False, description="return the prompt's tokens and log-probs in `logprobs`")
    logprobs: StrictInt | None = Field(None, ge=0, description="top log-probs per returned token (plus its own)")
    prompt_logprobs: StrictInt | None = Field(None, ge=0, description="top log-probs per prompt position (vLLM)")
    temperature: StrictFloat | StrictInt | None = Field(1.0, ge=0, le=100, description="for the token generated")
    top_p: StrictFloat | StrictInt | None = Field(1.0, gt=0, le=1)
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    n: StrictInt | None = Field(1, ge=1, le=1, description="one completion per prompt")
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
    rank: int | None = Field(description="1 for the most likely token; null when outside the top-k asked for")
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

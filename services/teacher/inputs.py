"""Checks of request input that the schemas cannot state (they depend on the model and the limits), shared
by every route. Each failure is a `BadInput` naming the field, which the service answers with a 4xx."""

from __future__ import annotations

from services.teacher import schemas
from services.teacher.engines.types import MAX_TEMPERATURE, MIN_SCORE_TEMPERATURE, SamplingSpec, ScoreItem


class BadInput(Exception):
    def __init__(self, field: str | None, message: str, status: int = 422, kind: str = "invalid_request"):
        super().__init__(message)
        self.field, self.message, self.status, self.kind = field, message, status, kind


def check_ids(field: str, seqs: list[list[int]], vocab: int, max_len: int, limits) -> int:
    """Sequence count, lengths and id ranges within `limits` (the service's settings); the total tokens."""
    if len(seqs) > limits.max_sequences:
        raise BadInput(field, f"{len(seqs)} sequences, more than the limit of {limits.max_sequences}")
    total = 0
    for i, seq in enumerate(seqs):
        if not seq:
            raise BadInput(f"{field}[{i}]", "empty sequence")
        if len(seq) > max_len:
            raise BadInput(f"{field}[{i}]", f"{len(seq)} tokens, more than the limit of {max_len}")
        lo, hi = min(seq), max(seq)
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise BadInput(f"{field}[{i}][{seq.index(bad)}]", f"token id {bad} outside the vocabulary [0, {vocab})")
        total += len(seq)
    if total > limits.max_request_tokens:
        raise BadInput(field, f"{total} tokens in the request, more than the limit of {limits.max_request_tokens}")
    return total


def check_top_k(top_k: int, limits, field: str = "top_k") -> None:
    if top_k > limits.max_top_k:
        raise BadInput(field, f"{field} {top_k} is over this teacher's limit of {limits.max_top_k}")


def score_items(body: schemas.ScoreRequest, info, settings) -> list[ScoreItem]:
    check_top_k(body.top_k, settings)
    # a scored sequence needs one position of headroom in engines that also sample a token
    check_ids("sequences", body.sequences, info.vocab_size, info.max_model_len - 1, settings)
    starts = body.start if isinstance(body.start, list) else [body.start] * len(body.sequences)
    if len(starts) != len(body.sequences):
        raise BadInput("start", f"{len(starts)} start positions for {len(body.sequences)} sequences")
    for i, (s, seq) in enumerate(zip(starts, body.sequences, strict=True)):
        if not 1 <= s < len(seq):
            where = "start" if isinstance(body.start, int) else f"start[{i}]"
            raise BadInput(where, f"start {s} must be >= 1 and < the sequence's length {len(seq)} (sequence {i})")
    temperature = check_score_temperature(body.temperature, info)
    return [
        ScoreItem(seq, s, body.top_k, temperature=temperature) for seq, s in zip(body.sequences, starts, strict=True)
    ]


def check_score_temperature(temperature: float | None, info, field: str = "temperature") -> float:
    """The temperature that scores are taken at (None: 1), when this engine honours it (else `BadInput`)."""
    temperature = 1.0 if temperature is None else float(temperature)
    if temperature < MIN_SCORE_TEMPERATURE:  # /v1/completions' prompt log-probs (the score schema bounds it)
        raise BadInput(field, f"log-probs are taken at temperature {temperature}, below the least one scored "
                       f"({MIN_SCORE_TEMPERATURE}): send a larger one, or 0 for log-probs at 1")  # fmt: skip
    if temperature != 1.0 and not info.score_temperature:
        raise BadInput(field, f"this {info.engine} engine scores at temperature 1 only (its model has no logits scale "
                       f"to set): send {field} 1, or serve the model with --engine hf")  # fmt: skip
    return temperature


def continue_items(body: schemas.ContinueRequest, info, settings):
    check_top_k(body.top_k, settings)
    check_ids("prefixes", body.prefixes, info.vocab_size, info.max_model_len, settings)
    for i, p in enumerate(body.prefixes):
        if len(p) + body.max_tokens > info.max_model_len:
            raise BadInput(
                "max_tokens",
                f"prefix {i} ({len(p)} tokens) plus max_tokens {body.max_tokens} exceeds max_model_len "
                f"{info.max_model_len}",
            )
    for j, t in enumerate(body.stop_ids):
        if not 0 <= t < info.vocab_size:
            raise BadInput(f"stop_ids[{j}]", f"token id {t} outside the vocabulary [0, {info.vocab_size})")
    check_temperature(body.temperature, info)
    spec = SamplingSpec(
        max_tokens=body.max_tokens,
        temperature=float(body.temperature),
        top_p=float(body.top_p),
        seed=body.seed,
        stop_ids=tuple(body.stop_ids),
        top_k=body.top_k,
    )
    return body.prefixes, spec


def check_temperature(temperature: float | None, info) -> None:
    """A sampling temperature above what the engine takes (MAX_TEMPERATURE) is the client's to change: a 422."""
    limit = MAX_TEMPERATURE.get(getattr(info, "engine", None))
    if temperature is not None and limit is not None and temperature > limit:
        raise BadInput(
            "temperature",
            f"temperature {temperature} is above {limit}, the most the {info.engine} engine samples at (a teacher "
            "served with --engine hf takes up to 100)",
        )

"""What every teacher engine takes and returns: the request items, the sampling settings, the model's description.

A leaf module (it imports the protocol's result types and nothing else of the service), so that the engine
interface (`engines`) and each engine (`engine_vllm`, the hf engine) import it and not each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.teacher.protocol import ContinueResult as Continued
from services.teacher.protocol import ScoreResult as Scored
from services.teacher.protocol import chat_template_fingerprint, tokenizer_fingerprint

__all__ = [
    "Continued",
    "ModelInfo",
    "SamplingSpec",
    "ScoreItem",
    "Scored",
    "describe",
    "join_scored",
    "stop_ids",
    "union_of_stops",
]


@dataclass
class ScoreItem:
    ids: list[int]
    start: int
    top_k: int
    ranks: bool = False  # also the rank of each scored token in the vocabulary (ScoreResult.ranks)
    temperature: float = 1.0  # log-probs and top-k of softmax(logits / temperature)


@dataclass(frozen=True)
class SamplingSpec:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    top_k: int = 0


# the highest sampling temperature an engine takes (vLLM refuses more than 2); the service refuses a request above
# it with a 422 naming `temperature`, never passing it on to fail inside the engine
MAX_TEMPERATURE = {"vllm": 2.0}
# the lowest temperature scores are taken at (logits / T must stay finite in float32)
MIN_SCORE_TEMPERATURE = 0.01


@dataclass
class ModelInfo:
    model: str
    engine: str
    dtype: str
    vocab_size: int
    max_model_len: int
    eos_id: int | None
    stop_ids: list[int]
    tokenizer_sha256: str
    chat_template_sha256: str | None
    score_temperature: bool = True  # whether scores honour a temperature other than 1
    extra: dict = field(default_factory=dict)


def describe(model_dir: str, engine: str, dtype: str, vocab_size: int, max_model_len: int, config_eos) -> ModelInfo:
    """What `/v1/info` tells of a loaded model. `vocab_size` is the model's embedding rows, which may exceed the
    tokenizer's length (Qwen pads them); `config_eos` is the model config's `eos_token_id`."""
    eos_id, stops = stop_ids(model_dir, config_eos)
    return ModelInfo(
        model=Path(model_dir).name or str(model_dir),
        engine=engine,
        dtype=dtype,
        vocab_size=vocab_size,
        max_model_len=max_model_len,
        eos_id=eos_id,
        stop_ids=stops,
        tokenizer_sha256=tokenizer_fingerprint(model_dir),
        chat_template_sha256=chat_template_fingerprint(model_dir),
    )


def _ids(eos) -> list[int]:
    """An `eos_token_id` as configs hold it (absent, an int or a list of ints) as a list."""
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]


def union_of_stops(config_eos, generation_eos, tokenizer_eos) -> tuple[int | None, list[int]]:
    """(eos_id, stop ids): the sorted union of the three eos settings (each absent, an int or a list), and the
    first id met in that order, which older clients read as `eos_id`."""
    ordered = _ids(config_eos) + _ids(generation_eos) + _ids(tokenizer_eos)
    return (ordered[0] if ordered else None), sorted(set(ordered))


def stop_ids(model_dir: str | Path, config_eos) -> tuple[int | None, list[int]]:
    """(eos_id, stop ids) of the model in `model_dir` whose config says `config_eos`: every id that ends its
    generation. Qwen's instruct models end a chat turn with `<|im_end|>` and a document with `<|endoftext|>`,
    and list both only in `generation_config.json`, so no single setting is enough."""
    from transformers import AutoTokenizer

    path = Path(model_dir)
    generation = path / "generation_config.json"
    generation_eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    return union_of_stops(config_eos, generation_eos, AutoTokenizer.from_pretrained(path).eos_token_id)


def join_scored(pieces: list[Scored], top_k: int, ranks: bool) -> Scored:
    """The scores of consecutive pieces of one sequence as one (no pieces: no scored tokens)."""
    if not pieces:
        return Scored(
            np.zeros(0, np.float32),
            np.zeros((0, top_k), np.int32),
            np.zeros((0, top_k), np.float32),
            np.zeros(0, np.int32) if ranks else None,
        )
    return Scored(
        np.concatenate([p.logprobs for p in pieces]),
        np.concatenate([p.top_ids for p in pieces]),
        np.concatenate([p.top_logprobs for p in pieces]),
        np.concatenate([p.ranks for p in pieces]) if ranks else None,
    )

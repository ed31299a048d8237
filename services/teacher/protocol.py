"""The v1 wire protocol shared by the service and its client: fingerprints, and the binary codec.

Imports no web framework, so that trainers can use it without the server's dependencies.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROTOCOL_VERSION = 1


def _sha256_json(obj) -> str:
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    """sha256 of a canonical serialisation of the tokenizer in `model_dir`.

    With a fast tokenizer (`tokenizer.json`) that is the whole tokenizer JSON (model, vocabulary, merges,
    normalisers, added tokens) with sorted keys; otherwise the vocabulary and special tokens as loaded by
    transformers. Two directories with the same fingerprint map text to ids identically.
    """
    path = Path(model_dir)
    fast = path / "tokenizer.json"
    if fast.is_file():
        return _sha256_json(json.loads(fast.read_text(encoding="utf-8")))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return _sha256_json({"vocab": tok.get_vocab(), "special": tok.special_tokens_map})


def chat_template(model_dir: str | Path) -> str | None:
    path = Path(model_dir)
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = path / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if template is not None:
            return template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return None


def chat_template_fingerprint(model_dir: str | Path) -> str | None:
    """sha256 of the chat template text, or None when the model has none."""
    template = chat_template(model_dir)
    return None if template is None else hashlib.sha256(template.encode("utf-8")).hexdigest()


# ---- results and the binary codec -------------------------------------------------------------------

BINARY_MEDIA_TYPE = "application/x-safetensors"
JSON_MEDIA_TYPE = "application/json"
FINISH_REASONS = ("length", "stop")


@dataclass
class ScoreResult:
    """Scores of `ids[start:]`: `logprobs` (N,), `top_ids` (N, k) int32, `top_logprobs` (N, k) float32, and
    where the item asked for them the `ranks` (N,) int32 of the scored tokens (1: the most likely; as vLLM
    counts, the tokens at least as likely). Ranks serve `/v1/completions` and never travel the binary protocol."""

    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    ranks: np.ndarray | None = None

    def to_torch(self):
        return _to_torch(self)


@dataclass
class ContinueResult:
    """A continuation: its `token_ids` (N,), their log-probs, the top-k at each generated position."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    finish_reason: str  # "stop" | "length"

    def to_torch(self):
        return _to_torch(self)


def _to_torch(result):
    """The same result with torch tensors (int64 ids) in place of numpy arrays."""
    import dataclasses

    import torch

    def convert(value):
        if isinstance(value, np.ndarray):
            tensor = torch.from_numpy(np.ascontiguousarray(value))
            return tensor.long() if value.dtype == np.int32 else tensor
        return value

    return dataclasses.replace(result, **{f.name: convert(getattr(result, f.name)) for f in dataclasses.fields(result)})


def _concat(arrays: list[np.ndarray], dtype, k: int | None = None) -> np.ndarray:
    if arrays:
        return np.ascontiguousarray(np.concatenate(arrays).astype(dtype, copy=False))
    return np.zeros((0,) if k is None else (0, k), dtype=dtype)


def _offsets(lengths: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def encode_results(results: list[ScoreResult] | list[ContinueResult], usage: dict[str, int]) -> bytes:
    """Ragged per-sequence arrays concatenated, with `offsets` (n+1 entries), as a safetensors body."""
    from safetensors.numpy import save

    k = results[0].top_ids.shape[1] if results else 0
    arrays = {
        "offsets": _offsets([len(r.logprobs) for r in results]),
        "logprobs": _concat([r.logprobs for r in results], np.float32),
        "top_ids": _concat([r.top_ids for r in results], np.int32, k),
        "top_logprobs": _concat([r.top_logprobs for r in results], np.float32, k),
    }
    if results and isinstance(results[0], ContinueResult):
        arrays["token_ids"] = _concat([r.token_ids for r in results], np.int32)
        arrays["finish_reason"] = np.array([FINISH_REASONS.index(r.finish_reason) for r in results], np.int8)
    metadata = {"protocol": str(PROTOCOL_VERSION), "usage": json.dumps(usage, sort_keys=True)}
    return save(arrays, metadata=metadata)


def _metadata(body: bytes) -> dict[str, str]:
    (size,) = struct.unpack("<Q", body[:8])
    return json.loads(body[8 : 8 + size]).get("__metadata__", {})


def decode_results(body: bytes) -> tuple[list[ScoreResult] | list[ContinueResult], dict[str, int]]:
    from safetensors.numpy import load

    arrays = load(body)
    usage = json.loads(_metadata(body).get("usage", "{}"))
    offsets = arrays["offsets"]
    out = []
    for i in range(len(offsets) - 1):
        span = slice(int(offsets[i]), int(offsets[i + 1]))
        parts = (arrays["logprobs"][span], arrays["top_ids"][span], arrays["top_logprobs"][span])
        if "token_ids" in arrays:
            reason = FINISH_REASONS[int(arrays["finish_reason"][i])]
            out.append(ContinueResult(arrays["token_ids"][span], *parts, reason))
        else:
            out.append(ScoreResult(*parts))
    return out, usage


def results_to_json(results: list[ScoreResult] | list[ContinueResult]) -> list[dict]:
    out = []
    for r in results:
        item = {
            "logprobs": r.logprobs.tolist(),
            "top_ids": r.top_ids.tolist(),
            "top_logprobs": r.top_logprobs.tolist(),
        }
        if isinstance(r, ContinueResult):
            item = {"token_ids": r.token_ids.tolist(), **item, "finish_reason": r.finish_reason}
        out.append(item)
    return out


def results_from_json(items: list[dict]) -> list[ScoreResult] | list[ContinueResult]:
    out = []
    for item in items:
        n = len(item["logprobs"])
        parts = (
            np.asarray(item["logprobs"], dtype=np.float32),
            np.asarray(item["top_ids"], dtype=np.int32).reshape(n, -1),
            np.asarray(item["top_logprobs"], dtype=np.float32).reshape(n, -1),
        )
        if "token_ids" in item:
            out.append(ContinueResult(np.asarray(item["token_ids"], dtype=np.int32), *parts, item["finish_reason"]))
        else:
            out.append(ScoreResult(*parts))
    return out

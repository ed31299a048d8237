"""The v1 wire protocol shared by the service and its client: fingerprints, and the binary codec.

Imports no web framework, so that trainers can use it without the server's dependencies.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

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

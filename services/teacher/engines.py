"""Engine interface of the teacher service, and the transformers (`hf`) engine.

An engine scores token sequences and continues prefixes, returning numpy arrays; it never detokenises.
The service's batcher calls it from one worker thread, so engines need not be thread-safe.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.teacher.protocol import ContinueResult as Continued
from services.teacher.protocol import ScoreResult as Scored
from services.teacher.protocol import chat_template_fingerprint, tokenizer_fingerprint
from tropd.errors import UserError, first_line

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ScoreItem:
    ids: list[int]
    start: int
    top_k: int


@dataclass(frozen=True)
class SamplingSpec:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    top_k: int = 0


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


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def load_engine(
    name: str,
    model_dir: str,
    *,
    dtype: str = "float32",
    max_top_k: int = 20,
    warn: Callable[[str], None] = print,
    **vllm_options,
):
    """`name` is `vllm`, `hf` or `auto`: vLLM when it is installed and starts here, else hf, with one line to
    `warn` saying why (a vLLM build for another CPU or CUDA, a model architecture it lacks...)."""
    if name == "auto":
        if not vllm_available():
            return HFEngine(model_dir, dtype=dtype)
        try:
            return _vllm_engine(model_dir, dtype=dtype, max_top_k=max_top_k, **vllm_options)
        except Exception as error:  # noqa: BLE001 - whatever stops vLLM, the reference engine can still serve
            warn(f"vLLM cannot start here ({type(error).__name__}: {first_line(error)}); using the hf engine")
            return HFEngine(model_dir, dtype=dtype)
    if name == "vllm":
        try:
            return _vllm_engine(model_dir, dtype=dtype, max_top_k=max_top_k, **vllm_options)
        except Exception as error:  # noqa: BLE001 - vLLM's own log above says more; the user needs the way out
            raise UserError(
                f"vLLM cannot start here ({type(error).__name__}: {first_line(error)}): use --engine hf (or auto)"
            ) from error
    if name == "hf":
        return HFEngine(model_dir, dtype=dtype)
    raise ValueError(f"unknown engine {name!r}: choose vllm, hf or auto")


def _vllm_engine(model_dir: str, **options):
    from services.teacher.engine_vllm import VLLMEngine

    return VLLMEngine(model_dir, **options)


class HFEngine:
    """The reference engine: a transformers forward pass, float32 by default, on CPU or one GPU."""

    name = "hf"

    def __init__(self, model_dir: str, dtype: str = "float32", device: str | None = None):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        config = AutoConfig.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(self.device)
        self.model.eval()
        max_len = getattr(config, "max_position_embeddings", None) or 2048
        self.info = describe(model_dir, "hf", dtype, config.vocab_size, max_len, config.eos_token_id)

    def score(self, items: list[ScoreItem]) -> list[Scored]:
        torch = self.torch
        width = max(len(it.ids) for it in items)
        ids = torch.zeros((len(items), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, it in enumerate(items):
            ids[i, : len(it.ids)] = torch.tensor(it.ids)
            attn[i, : len(it.ids)] = 1
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).logits
            out = []
            for i, it in enumerate(items):
                # row p predicts token p + 1: rows start-1 .. n-2 score tokens start .. n-1
                logp = torch.log_softmax(logits[i, it.start - 1 : len(it.ids) - 1].float(), dim=-1)
                target = ids[i, it.start : len(it.ids)].to(self.device)
                chosen = logp.gather(-1, target[:, None]).squeeze(-1)
                top_lp, top_ids = logp.topk(it.top_k, dim=-1) if it.top_k else (logp[:, :0], logp[:, :0].long())
                out.append(_scored(chosen, top_ids, top_lp))
        return out

    def generate(self, prefixes: list[list[int]], spec: SamplingSpec) -> list[Continued]:
        torch = self.torch
        gen = torch.Generator(device=self.device)
        gen.manual_seed(spec.seed if spec.seed is not None else int(torch.seed() % 2**63))
        stops = set(spec.stop_ids) | set(self.info.stop_ids)
        width = max(len(p) for p in prefixes)
        B = len(prefixes)
        ids = torch.zeros((B, width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prefixes):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        done = [False] * B
        rows: list[list[tuple[int, float, list[int], list[float]]]] = [[] for _ in range(B)]
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            next_pos = pos[:, -1:] + 1
            for _ in range(spec.max_tokens):
                logits = out.logits[:, -1, :].float()
                logp = torch.log_softmax(logits, dim=-1)  # reported at temperature 1, as scoring is
                if spec.temperature == 0:
                    tok = logits.argmax(-1)
                else:
                    tok = torch.multinomial(_top_p_probs(logits / spec.temperature, spec.top_p), 1, generator=gen)[:, 0]
                top_lp, top_ids = logp.topk(spec.top_k, dim=-1) if spec.top_k else (logp[:, :0], logp[:, :0].long())
                chosen = logp.gather(-1, tok[:, None])[:, 0]
                for i in range(B):
                    if not done[i]:
                        t = int(tok[i])
                        rows[i].append((t, float(chosen[i]), top_ids[i].tolist(), top_lp[i].tolist()))
                        done[i] = t in stops
                if all(done):
                    break
                mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=self.device)], dim=-1)
                out = self.model(
                    input_ids=tok[:, None],
                    attention_mask=mask,
                    position_ids=next_pos,
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
                next_pos = next_pos + 1
        return [_continued(r, spec.top_k, d) for r, d in zip(rows, done, strict=True)]

    def close(self) -> None:
        return None


def _top_p_probs(logits, top_p: float):
    import torch

    probs = torch.softmax(logits, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def _scored(chosen, top_ids, top_lp) -> Scored:
    return Scored(
        chosen.cpu().numpy().astype(np.float32),
        top_ids.cpu().numpy().astype(np.int32),
        top_lp.cpu().numpy().astype(np.float32),
    )


def _continued(rows, k: int, stopped: bool) -> Continued:
    n = len(rows)
    return Continued(
        np.array([r[0] for r in rows], dtype=np.int32),
        np.array([r[1] for r in rows], dtype=np.float32),
        np.array([r[2] for r in rows], dtype=np.int32).reshape(n, k),
        np.array([r[3] for r in rows], dtype=np.float32).reshape(n, k),
        "stop" if stopped else "length",
    )

"""The engine by name: `load_engine("vllm" | "hf" | "auto", model_dir, ...)`, with the fallback from vLLM to hf."""

from __future__ import annotations

from collections.abc import Callable

from services.teacher.engines.hf import HFEngine
from tropd.errors import UserError, first_line
from tropd.machine import vllm_available


def load_engine(
    name: str,
    model_dir: str,
    *,
    dtype: str = "auto",
    max_top_k: int = 20,
    warn: Callable[[str], None] = print,
    **vllm_options,
):
    """`name` is `vllm`, `hf` or `auto`: vLLM when it is installed and starts here, else hf, with one line to
    `warn` saying why (a vLLM build for another CPU or CUDA, a model architecture it lacks...). `dtype` "auto" is
    resolved here (`resolve_dtype`), before it reaches vLLM, whose own "auto" means the model config's dtype."""
    dtype = resolve_dtype(dtype)
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
    from services.teacher.engines.vllm import VLLMEngine

    return VLLMEngine(model_dir, **options)


def resolve_dtype(dtype: str) -> str:
    """`auto`: bfloat16 on a CUDA device that supports it, float32 on CPU; any other value as it is."""
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"

"""Loading the student: any Hugging Face causal LM directory, float32 master weights, on the chosen device."""

from __future__ import annotations

from pathlib import Path

import torch

from tropd.errors import UserError, first_line


def quiet_transformers() -> None:
    """Keep transformers' per-file progress bars out of our progress output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_causal_lm(path: str | Path, device: torch.device | str = "cpu"):
    """A causal LM from a model directory in float32 (the master weights; bf16 runs autocast), eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(device).eval()


def load_student(path: str | Path, device: torch.device, gradient_checkpointing: bool = False):
    try:
        model = load_causal_lm(path, device)
    except Exception as exc:  # transformers and safetensors raise many kinds; each means "no loadable model here"
        raise UserError(f"cannot load the student model from {path}: {first_line(exc)}") from None
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise UserError(f"gradient_checkpointing: the student's architecture ({model.config.model_type}) does not "
                            "support it")  # fmt: skip
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def empty_student(path: str | Path, gradient_checkpointing: bool = False):
    """The student's architecture on the meta device, no weights read (FSDP ranks other than 0 get theirs from rank
    0's by broadcast). The directory was already loaded once by rank 0, so its config is known to be readable."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def decoder_layers(model) -> list[torch.nn.Module]:
    """The student's transformer blocks (FSDP2 shards each on its own), or [] when they cannot be found."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


def resolve_dtype(choice: str, device: torch.device) -> str:
    """`dtype: auto` on this device: bfloat16 on a CUDA device that supports it, float32 elsewhere."""
    if choice != "auto":
        return choice
    return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"


def autocast_dtype(config) -> torch.dtype | None:
    """The autocast of the sampling and training forwards alike (None: plain float32). `config.dtype` resolved."""
    if config.dtype == "auto":
        raise ValueError("dtype auto is resolved when a run starts (trainer.models.resolve_dtype)")
    return torch.bfloat16 if config.dtype == "bfloat16" else None

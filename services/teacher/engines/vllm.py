"""The production engine: vLLM's engine run inside the service's process.

On a small model the split between an API process and an engine-core process costs more than the model
itself (see the notes on vLLM), so the engine core runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`),
driven by the service's batching thread. Scoring uses prompt log-probs with `detokenize=False` and flat
log-prob containers; nothing is ever detokenised.
"""

from __future__ import annotations

import os

import numpy as np

from services.teacher.engines.types import Continued, SamplingSpec, Scored, ScoreItem, describe


class VLLMEngine:
    name = "vllm"
    # a seeded request samples from a generator of its own: a draft does not depend on the other prefixes of its
    # engine call, so the batcher may split a continuation request by prefix (services/teacher/batching.py)
    batch_invariant_drafts = True

    def __init__(
        self,
        model_dir: str,
        *,
        dtype: str = "float32",
        max_top_k: int = 20,
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        tensor_parallel_size: int = 1,
        seed: int = 0,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM 0.32's ahead-of-time compile cache fails to load on CPU ("Compiling model again due to a load
        # failure"), so every start compiled the model again; its standard compile cache loads, and a start of a
        # model compiled before skips the compile
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        self._sampling_params, self._prompt = SamplingParams, TokensPrompt
        if gpu_memory_utilization is None:
            # on CPU this is the share of RAM kept for the KV cache; vLLM reads one NUMA node's memory
            gpu_memory_utilization = 0.9 if torch.cuda.is_available() else 0.15
        options = dict(
            model=model_dir,
            dtype=dtype,
            max_logprobs=max(max_top_k, 1),
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
        )
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
        self.llm = LLM(**options)
        config = self.llm.llm_engine.model_config
        eos = config.hf_config.eos_token_id
        self.info = describe(model_dir, "vllm", dtype, config.get_vocab_size(), config.max_model_len, eos)
        # vLLM's prompt log-probs are taken at temperature 1; a scoring temperature divides the logits through the
        # scale of the model's logits processor (every generative model of vLLM's has one), set for the engine call
        # and set back after it: the engine core runs in this process, so its model is at hand
        self._logits = _logits_processor(self.llm)
        self.info.score_temperature = self._logits is not None

    def score(self, items: list[ScoreItem]) -> list[Scored]:
        out: list[Scored | None] = [None] * len(items)
        for temperature in sorted({it.temperature for it in items}):  # one engine call per temperature asked
            index = [i for i, it in enumerate(items) if it.temperature == temperature]
            for i, scored in zip(index, self._score_at(temperature, [items[i] for i in index]), strict=True):
                out[i] = scored
        return out

    def _score_at(self, temperature: float, items: list[ScoreItem]) -> list[Scored]:
        prompts = [self._prompt(prompt_token_ids=it.ids) for it in items]
        params = [
            self._sampling_params(
                max_tokens=1, prompt_logprobs=it.top_k, detokenize=False, flat_logprobs=True, temperature=1.0
            )
            for it in items
        ]
        base = self._logits.scale if self._logits is not None else 1.0
        if temperature != 1.0:
            self._logits.scale = base / temperature
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        finally:
            if temperature != 1.0:
                self._logits.scale = base
        return [_flat_to_scored(out.prompt_logprobs, it) for out, it in zip(outputs, items, strict=True)]

    def generate(self, prefixes: list[list[int]], spec: SamplingSpec) -> list[Continued]:
        stops = sorted(set(spec.stop_ids) | set(self.info.stop_ids))
        params = self._sampling_params(
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            seed=spec.seed,
            stop_token_ids=stops,
            ignore_eos=True,  # the model's eos ids are all in `stops`: each ends the draft and stays in its tokens
            logprobs=spec.top_k,
            detokenize=False,
            flat_logprobs=True,
        )
        outputs = self.llm.generate([self._prompt(prompt_token_ids=p) for p in prefixes], params, use_tqdm=False)
        return [_flat_to_continued(out.outputs[0], spec.top_k, set(stops)) for out in outputs]

    def alive(self) -> bool:
        """False once vLLM has found its engine-core process dead (with VLLM_ENABLE_V1_MULTIPROCESSING=1);
        the in-process core (the default here) fails by raising instead."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        return not getattr(getattr(core, "resources", None), "engine_dead", False)

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()


def _logits_processor(llm):
    """The model's logits processor, whose `scale` multiplies every logit; None when the engine core runs in another
    process or the model has none."""
    executor = getattr(llm.llm_engine, "model_executor", None)
    if executor is None:
        return None
    try:
        model = executor.collective_rpc(lambda worker: worker.get_model(), single_value=True)
    except Exception:  # an executor that cannot hand its model over: scoring stays at temperature 1
        return None
    processor = getattr(model, "logits_processor", None)
    return processor if isinstance(getattr(processor, "scale", None), (int, float)) else None


def _unflatten(flat, first: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(chosen logprobs N, top ids N x k, top logprobs N x k) from positions `first..` of vLLM's flat
    log-probs, which hold at each position the chosen token first, then the top-k by rank (so the chosen
    token may appear twice)."""
    starts = np.asarray(flat.start_indices[first:], dtype=np.int64)
    ends = np.asarray(flat.end_indices[first:], dtype=np.int64)
    values = np.asarray(flat.logprobs, dtype=np.float32)
    ids = np.asarray(flat.token_ids, dtype=np.int32)
    if not np.all(ends - starts == k + 1):  # a layout we do not expect: order by rank, one position at a time
        ranks = flat.ranks
        top = [sorted(range(s + 1, e), key=lambda j: ranks[j])[:k] for s, e in zip(starts, ends, strict=True)]
        index = np.asarray(top, dtype=np.int64).reshape(len(starts), k)
    else:
        index = starts[:, None] + 1 + np.arange(k)[None, :]
    return values[starts], ids[index], values[index]


def _flat_to_scored(flat, item: ScoreItem) -> Scored:
    ranks = None
    if item.ranks:  # the scored token's rank is first at each position, before the top-k's
        ranks = np.asarray(flat.ranks, dtype=np.int32)[np.asarray(flat.start_indices[item.start :], dtype=np.int64)]
    return Scored(*_unflatten(flat, item.start, item.top_k), ranks)


def _flat_to_continued(completion, k: int, stops: set[int]) -> Continued:
    tokens = np.asarray(completion.token_ids, dtype=np.int32)
    finished = "stop" if len(tokens) and int(tokens[-1]) in stops else "length"
    return Continued(tokens, *_unflatten(completion.logprobs, 0, k), finished)

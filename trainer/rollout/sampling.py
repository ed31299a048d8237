"""Sampling from a causal LM with a KV cache: left-padded prompts, temperature, top-p, stop ids, banned ids.

The model decodes through `trainer.rollout.decode.decoder_for(model)`: its own forward and cache (with `compiled`, a
static cache and a compiled step), or for a small plain
Llama on CPU a hand-written decoder that is measured faster there. Sampling runs on the model's device; the
returned tensors are on CPU.

Shapes: B prompts, P padded prompt length, T generated tokens, V vocabulary (rows of the output head).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from trainer.rollout.decode import decoder_for


@dataclass
class Samples:
    """Generated tokens of B prompts, on CPU. `response_ids_B_T` is right-padded with `pad_id`; `lengths_B`
    counts generated tokens including the stop token when one was produced."""

    prompt_ids: list[list[int]]
    response_ids_B_T: torch.Tensor
    lengths_B: torch.Tensor
    logprobs_B_T: torch.Tensor  # log-prob of each sampled token under the sampling distribution at T=1
    finished_B: torch.Tensor

    def responses(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.response_ids_B_T, self.lengths_B.tolist(), strict=True)]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def top_p_filter(logits_B_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits outside the smallest set whose probability reaches `top_p` are set to -inf."""
    if top_p >= 1.0:
        return logits_B_V
    sorted_logits, order = torch.sort(logits_B_V, descending=True, dim=-1)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits_B_V.masked_fill(drop, float("-inf"))


def blocked_ids(vocab: int, banned_ids: Sequence[int], vocab_limit: int | None, device) -> torch.Tensor:
    """blocked_V: True for the ids never to sample, the banned ones and those at or above `vocab_limit` (rows of
    the embedding table that no token maps to). Banned ids outside the vocabulary cannot be sampled anyway."""
    if vocab_limit is not None and vocab_limit < 1:
        raise ValueError(f"vocab_limit must be at least 1, not {vocab_limit}")
    blocked_V = torch.zeros(vocab, dtype=torch.bool)
    blocked_V[torch.tensor([i for i in banned_ids if 0 <= i < vocab], dtype=torch.long)] = True
    if vocab_limit is not None:
        blocked_V[vocab_limit:] = True
    if bool(blocked_V.all()):
        raise ValueError(f"every id of the vocabulary ({vocab}) is banned or at or above vocab_limit")
    return blocked_V.to(device)


def draw(logits_B_V: torch.Tensor, u_B: torch.Tensor | None, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row: the argmax when `temperature == 0`, else the inverse CDF of
    `softmax(top_p_filter(logits / temperature))` at `u_B` (float32 logits, -inf where blocked)."""
    if temperature == 0:
        return logits_B_V.argmax(-1)
    probs_B_V = torch.softmax(top_p_filter(logits_B_V / temperature, top_p), dim=-1)
    cdf_B_V = probs_B_V.cumsum(-1)
    tok_B = torch.searchsorted(cdf_B_V, u_B[:, None] * cdf_B_V[:, -1:], right=True).squeeze(-1)
    tok_B = tok_B.clamp(max=probs_B_V.shape[-1] - 1)
    # never land on a zero-probability id through rounding at the top of the CDF
    return torch.where(probs_B_V.gather(-1, tok_B[:, None])[:, 0] > 0, tok_B, probs_B_V.argmax(-1))


def _device_of(model) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


# Every CHECK_EVERY tokens the loop asks which rows are still running: one host sync (the only one), the test of
# whether all rows have finished, and the moment rows that have finished leave the batch (when at most
# LEAVE_BELOW of it is still running), so that the tail of one long response does not carry the whole batch.
CHECK_EVERY = 8
LEAVE_BELOW = 0.75


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    eos_id: int | None = None,
    stop_ids: Sequence[int] = (),
    banned_ids: Sequence[int] = (),
    vocab_limit: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    uniforms_B_T: torch.Tensor | None = None,
    decoder: str = "auto",
    all_done: Callable[[bool], bool] | None = None,
    autocast_dtype: torch.dtype | None = None,
    check_every: int = CHECK_EVERY,
    compiled: bool = False,
) -> Samples:
    """Sample continuations; `temperature == 0` is greedy decoding. A row finishes at any of `stop_ids` (and
    `eos_id` when given) or after `max_new_tokens`; ids in `banned_ids` or at or above `vocab_limit` are never
    sampled. Runs on the model's device (any dtype: logits are cast to float32), under autocast to
    `autocast_dtype` when given (the training forward's, so that the policy that samples is the one that trains);
    the Samples are on CPU.

    Token t of row b is drawn by inverse CDF from `uniforms_B_T[b, t]` (drawn on CPU from `generator` when not
    given): a row's sample then does not depend on which other rows share its batch, so data-parallel ranks
    that each take a slice of the global batch sample exactly what one process would, and rows that have
    finished may leave the batch (every `check_every` tokens). `decoder` is "auto", "fast" or "library"
    (`trainer.rollout.decode.decoder_for`); `compiled` decodes over a static cache with a compiled step instead
    (`StaticDecoder`: the same tokens). `all_done(mine)`, when given, is a collective that says whether every
    process's rows have finished: ranks that share sharded weights must make the same number of forward calls,
    so each decodes until all are done.

    Shapes: B rows asked for, A rows still in the batch (`active_A` are their row numbers).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sample needs at least one prompt, and no empty prompt")
    if max_new_tokens < 1 or temperature < 0 or check_every < 1:
        raise ValueError(f"need max_new_tokens >= 1, temperature >= 0 and check_every >= 1, not {max_new_tokens}, "
                         f"{temperature} and {check_every}")  # fmt: skip
    device = _device_of(model)
    B = len(prompts)
    if temperature != 0:
        if uniforms_B_T is None:
            uniforms_B_T = torch.rand((B, max_new_tokens), generator=generator)
        if uniforms_B_T.shape[0] != B or uniforms_B_T.shape[1] < max_new_tokens:
            raise ValueError(f"uniforms_B_T is {tuple(uniforms_B_T.shape)}, need ({B}, >= {max_new_tokens})")
        uniforms_B_T = uniforms_B_T.to(device, torch.float32)
    ids_B_P, mask_B_P = (t.to(device) for t in left_pad(prompts, pad_id))
    position_B_P = (mask_B_P.cumsum(-1) - 1).clamp(min=0)
    stops = sorted(set(stop_ids) | ({eos_id} if eos_id is not None else set()))
    stops_S = torch.tensor(stops, dtype=torch.long, device=device)
    runner = decoder_for(model, decoder, compiled)
    with _autocast(device, autocast_dtype):
        logits_A_V = runner.prefill(ids_B_P, mask_B_P, position_B_P, max_new_tokens).float()
    blocked_V = blocked_ids(logits_A_V.shape[-1], banned_ids, vocab_limit, device)
    active_A = torch.arange(B, device=device)
    next_pos_A = position_B_P[:, -1] + 1
    tokens_B_T = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs_B_T = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    finished_B = torch.zeros(B, dtype=torch.bool, device=device)
    lengths_B = torch.zeros(B, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        logits_A_V = logits_A_V.masked_fill(blocked_V, float("-inf"))
        done_A = finished_B[active_A]
        u_A = None if temperature == 0 else uniforms_B_T[active_A, t]
        tok_A = torch.where(done_A, pad_id, draw(logits_A_V, u_A, temperature, top_p))
        logp_A = torch.log_softmax(logits_A_V, dim=-1).gather(-1, tok_A[:, None]).squeeze(-1)
        tokens_B_T[active_A, t] = tok_A
        logprobs_B_T[active_A, t] = torch.where(done_A, 0.0, logp_A)
        lengths_B[active_A] += (~done_A).long()
        finished_B[active_A] = done_A | torch.isin(tok_A, stops_S)
        if t == max_new_tokens - 1:
            break
        if (t + 1) % check_every == 0:
            running_A = ~finished_B[active_A]
            running = int(running_A.sum())  # the host sync
            if all_done(running == 0) if all_done is not None else running == 0:
                break
            if 0 < running <= LEAVE_BELOW * len(active_A):
                kept_A = runner.keep(running_A.nonzero()[:, 0])  # the running rows (a compiled batch: and some more)
                if kept_A is not None:
                    active_A, next_pos_A, tok_A = active_A[kept_A], next_pos_A[kept_A], tok_A[kept_A]
        with _autocast(device, autocast_dtype):
            logits_A_V = runner.step(tok_A, next_pos_A).float()
        next_pos_A = next_pos_A + 1
    T = int(lengths_B.max())  # later columns hold padding only (rows are checked every `check_every` tokens)
    return Samples(prompts, tokens_B_T[:, :T].cpu(), lengths_B.cpu(), logprobs_B_T[:, :T].cpu(), finished_B.cpu())


def batch_rows(prompts: list[list[int]], max_new_tokens: int, batch_tokens: int) -> list[slice]:
    """Consecutive batches of rows whose KV cache, rows x (longest prompt of the batch + `max_new_tokens`), stays
    within `batch_tokens` (0: one batch); a row that alone exceeds it is a batch of its own."""
    if batch_tokens <= 0:
        return [slice(0, len(prompts))]
    batches, start, longest = [], 0, 0
    for i, p in enumerate(prompts):
        wider = max(longest, len(p))
        if i > start and (i - start + 1) * (wider + max_new_tokens) > batch_tokens:
            batches.append(slice(start, i))
            start, wider = i, len(p)
        longest = wider
    batches.append(slice(start, len(prompts)))
    return batches


def sample_in_batches(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    batch_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    uniforms_B_T: torch.Tensor | None = None,
    **options,
) -> list[list[int]]:
    """The responses of `sample` over batches bounded in tokens (`batch_rows`). The uniforms are drawn for all rows
    at once first, so the responses are the same whatever the batches."""
    if temperature != 0 and uniforms_B_T is None:
        uniforms_B_T = torch.rand((len(prompts), max_new_tokens), generator=generator)
    responses: list[list[int]] = []
    for rows in batch_rows(prompts, max_new_tokens, batch_tokens):
        roll = sample(model, prompts[rows], max_new_tokens=max_new_tokens, temperature=temperature,
                      uniforms_B_T=None if uniforms_B_T is None else uniforms_B_T[rows], **options)  # fmt: skip
        responses += roll.responses()
    return responses


def response_forward(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """One forward pass over prompt + response (with gradient): what the model says at each response token.

    Returns `(logprobs_B_T, mask_B_T, logits_B_T_V)`, right-padded over the response positions: the log-prob of
    each response token given the prompt and the earlier response tokens, the response mask, and the model's raw
    scores there (for losses that need the full distribution).
    """
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    width = max(len(s) for s in seqs)
    T = max(len(r) for r in responses)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    logits = model(input_ids=ids, attention_mask=attn).logits
    # position of the first response token's prediction is len(prompt) - 1
    index = torch.zeros((len(seqs), T), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    targets = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        n = len(r)
        index[i, :n] = torch.arange(len(p) - 1, len(p) - 1 + n)
        index[i, n:] = len(p) - 1
        mask[i, :n] = True
        targets[i, :n] = torch.tensor(r, dtype=torch.long)
    logits_B_T_V = logits.gather(1, index[:, :, None].expand(-1, -1, logits.shape[-1])).float()
    logprobs_B_T = torch.log_softmax(logits_B_T_V, -1).gather(-1, targets[:, :, None]).squeeze(-1)
    return logprobs_B_T * mask, mask, logits_B_T_V

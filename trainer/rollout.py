"""Sampling from a causal LM with a KV cache: left-padded prompts, temperature, top-p, banned ids.

A Llama-architecture model decodes through `trainer.decode.LlamaDecoder` (the same arithmetic without the
library's per-token overhead); any other model through its own forward (`LibraryDecoder`).

Shapes: B prompts, P padded prompt length, T generated tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.decode import LibraryDecoder, decoder_for


@dataclass
class Rollout:
    """Generated tokens of B prompts. `response_ids_B_T` is right-padded with `pad_id`; `lengths_B`
    counts generated tokens including the eos when one was produced."""

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


@torch.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    banned_ids: tuple[int, ...] = (),
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    uniforms_B_T: torch.Tensor | None = None,
) -> Rollout:
    """Sample continuations; `temperature == 0` is greedy decoding. Stops at eos or `max_new_tokens`.

    Token t of row b is drawn by inverse CDF from `uniforms_B_T[b, t]` (drawn from `generator` when not
    given): a row's sample then does not depend on which other rows share its batch, so data-parallel
    ranks that each take a slice of the global batch sample exactly what one process would.
    """
    ids_B_P, mask_B_P = left_pad(prompts, pad_id)
    B = ids_B_P.shape[0]
    if uniforms_B_T is None and temperature != 0:
        uniforms_B_T = torch.rand((B, max_new_tokens), generator=generator)
    position_B_P = (mask_B_P.cumsum(-1) - 1).clamp(min=0)
    decoder = decoder_for(model) or LibraryDecoder(model)
    logits_B_V = decoder.prefill(ids_B_P, mask_B_P, position_B_P, max_new_tokens).float()
    next_pos_B = position_B_P[:, -1] + 1
    tokens, logprobs = [], []
    finished_B = torch.zeros(B, dtype=torch.bool)
    lengths_B = torch.zeros(B, dtype=torch.long)
    for t in range(max_new_tokens):
        if banned_ids:
            logits_B_V[:, list(banned_ids)] = float("-inf")
        logp_B_V = torch.log_softmax(logits_B_V, dim=-1)
        if temperature == 0:
            tok_B = logits_B_V.argmax(-1)
        else:
            probs = torch.softmax(top_p_filter(logits_B_V / temperature, top_p), dim=-1)
            cdf_B_V = probs.cumsum(-1)
            u_B = uniforms_B_T[:, t : t + 1] * cdf_B_V[:, -1:]
            tok_B = torch.searchsorted(cdf_B_V, u_B, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
            # never land on a zero-probability id through rounding at the top of the CDF
            tok_B = torch.where(probs.gather(-1, tok_B[:, None])[:, 0] > 0, tok_B, probs.argmax(-1))
        tok_B = torch.where(finished_B, torch.full_like(tok_B, pad_id), tok_B)
        tokens.append(tok_B)
        logprobs.append(torch.where(finished_B, 0.0, logp_B_V.gather(-1, tok_B[:, None]).squeeze(-1)))
        lengths_B += (~finished_B).long()
        finished_B |= tok_B == eos_id
        if bool(finished_B.all()):
            break
        logits_B_V = decoder.step(tok_B, next_pos_B).float()
        next_pos_B = next_pos_B + 1
    return Rollout(prompts, torch.stack(tokens, 1), lengths_B, torch.stack(logprobs, 1), finished_B)


def response_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Log-probs of each response token given prompt and earlier response tokens (with gradient).

    Returns `(logprobs_B_T, mask_B_T, logits_B_T_V)`, right-padded over the response positions; the
    logits are the model's raw scores at those positions (for losses that need the full distribution).
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

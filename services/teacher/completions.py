"""`POST /v1/completions` and `GET /v1/models`: teacher scoring in the shape of vLLM's OpenAI server.

Trainers written against vLLM (on-policy distillation recipes that score their rollouts with a stock
`vllm serve` teacher) can point at this service instead, and share its batcher, limits, fairness and auth.
The subset served is what teacher scoring uses:

- `prompt`: token ids (one list, or a list of lists); text is refused (this teacher never tokenises);
- `max_tokens`: 0 (with `echo`: the prompt's log-probs only) or 1 (one token generated, as vLLM's scoring
  recipes ask for); `echo`, `logprobs: k`, `prompt_logprobs: k`, `temperature`, `top_p`, `seed`, `n: 1`.

The answer follows vLLM's: position 0 of a prompt has no log-prob (`null`); at position p the entries are
the actual token first, then the top-k by rank without it (so k or k + 1 entries); `logprobs.top_logprobs`
holds the first `logprobs` + 1 of those, as OpenAI's API does; log-probs below -9999 are sent as -9999.
Where it differs, it says so: tokens are `token_id:<id>` (what vLLM sends with `--return-tokens-as-token-ids`)
and `text` is empty, since nothing is detokenised; with `max_tokens: 0`, `finish_reason` is "length" and
`completion_tokens` 0 (vLLM samples one token and drops it, and reports its finish reason and count). A
prompt token's `rank` is its place in the top-k when it is there, else the engine's count of tokens at least as
likely (vLLM's, for tokens outside the top-k asked for too). The prompt's log-probs are taken at the request's
`temperature` (log-softmax of logits / T; at 1 when it is 0 or absent), where vLLM's server takes them at 1
whatever it says: at temperature 1 the two agree.
"""

from __future__ import annotations

import itertools
import time
import uuid

from services.teacher import schemas
from services.teacher.engines.types import SamplingSpec, ScoreItem
from services.teacher.inputs import BadInput, check_ids, check_score_temperature, check_temperature, check_top_k

LOGPROB_FLOOR = -9999.0  # vLLM's (and OpenAI's) stand-in for -inf in JSON


def token_name(token_id: int) -> str:
    return f"token_id:{token_id}"


def model_list(info) -> dict:
    card = {
        "id": info.model,
        "object": "model",
        "created": 0,
        "owned_by": "tropd",
        "root": info.model,
        "max_model_len": info.max_model_len,
    }
    return {"object": "list", "data": [card]}


def _prompts(body: schemas.CompletionRequest) -> list[list[int]]:
    return body.prompt if isinstance(body.prompt[0], list) else [body.prompt]


def prompt_top_k(body: schemas.CompletionRequest) -> int | None:
    """Top-k per prompt position, or None for no prompt log-probs: `prompt_logprobs`, else `logprobs` with
    `echo` (vLLM's rule)."""
    if body.prompt_logprobs is not None:
        return body.prompt_logprobs
    return body.logprobs if body.echo else None


def prompt_temperature(body: schemas.CompletionRequest) -> float:
    """The temperature of the prompt's log-probs: the request's, or 1 when it is 0 (greedy: for the token
    generated) or absent. vLLM's stock server takes prompt log-probs at 1 whatever the request says."""
    return float(body.temperature) if body.temperature else 1.0


def check_request(body: schemas.CompletionRequest, info, settings) -> list[list[int]]:
    """The prompts, once every field is within this teacher's model and limits (else `BadInput`)."""
    if body.model is not None and body.model != info.model:
        raise BadInput("model", f"the model `{body.model}` does not exist here (GET /v1/models)", 404, "not_found")
    if body.max_tokens == 0 and not body.echo:
        raise BadInput("max_tokens", "max_tokens 0 returns nothing without echo: send echo true, or max_tokens 1")
    for name in ("logprobs", "prompt_logprobs"):
        if getattr(body, name) is not None:
            check_top_k(getattr(body, name), settings, name)
    if body.max_tokens == 1:  # the temperature samples the generated token
        check_temperature(body.temperature, info)
    if prompt_top_k(body) is not None:
        check_score_temperature(prompt_temperature(body), info)
    prompts = _prompts(body)
    # one position of headroom: the engines' scoring and the generated token both need it
    check_ids("prompt", prompts, info.vocab_size, info.max_model_len - 1, settings)
    return prompts


async def complete(body: schemas.CompletionRequest, batcher, info, settings, client: str) -> dict:
    """The response body (a dict ready for JSON) of one completions request, through the batcher."""
    prompts = check_request(body, info, settings)
    k = prompt_top_k(body)
    scored = {}
    if k is not None:
        to_score = [i for i, p in enumerate(prompts) if len(p) > 1]  # a 1-token prompt has nothing to score
        if to_score:
            t = prompt_temperature(body)
            results = await batcher.score([ScoreItem(prompts[i], 1, k, True, t) for i in to_score], client)
            scored = dict(zip(to_score, results, strict=True))
    generated = []
    if body.max_tokens == 1:
        spec = SamplingSpec(
            max_tokens=1,
            temperature=1.0 if body.temperature is None else float(body.temperature),
            top_p=1.0 if body.top_p is None else float(body.top_p),
            seed=body.seed,
            top_k=body.logprobs or 0,
        )
        generated = await batcher.generate(prompts, spec, client)
    choices = [
        _choice(i, body, prompt, scored.get(i), generated[i] if generated else None, k is not None)
        for i, prompt in enumerate(prompts)
    ]
    prompt_tokens = sum(map(len, prompts))
    completion_tokens = sum(len(g.token_ids) for g in generated)
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:16]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": info.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def position_entries(
    token: int, logprob: float, top_ids, top_logprobs, rank: int | None = None
) -> list[tuple[int, float, int | None]]:
    """(id, log-prob, rank) at one position: the actual token first, then the top-k by rank without it. The
    actual token's rank is its place in the top-k, else `rank` (the engine's count)."""
    top = [int(t) for t in top_ids]
    rank = top.index(token) + 1 if token in top else (None if rank is None else int(rank))
    entries = [(token, _floor(logprob), rank)]
    entries += [(t, _floor(lp), r + 1) for r, (t, lp) in enumerate(zip(top, top_logprobs, strict=True)) if t != token]
    return entries


def _floor(logprob) -> float:
    return max(float(logprob), LOGPROB_FLOOR)


def prompt_positions(prompt: list[int], scores) -> list[list | None]:
    """Entries of every prompt position: None at position 0 (nothing before it predicts it)."""
    if scores is None:
        return [None] * len(prompt)
    ranks = scores.ranks if scores.ranks is not None else [None] * len(scores.logprobs)
    rows = zip(prompt[1:], scores.logprobs, scores.top_ids, scores.top_logprobs, ranks, strict=True)
    return [None] + [position_entries(t, lp, ids, lps, r) for t, lp, ids, lps, r in rows]


def _choice(index: int, body, prompt: list[int], scores, draft, with_prompt_logprobs: bool) -> dict:
    positions = prompt_positions(prompt, scores)
    tokens, entries = (list(prompt), list(positions)) if body.echo else ([], [])
    finish = "length"
    if draft is not None:
        token = int(draft.token_ids[0])
        tokens.append(token)
        entries.append(position_entries(token, draft.logprobs[0], draft.top_ids[0], draft.top_logprobs[0]))
        finish = draft.finish_reason
    prompt_logprobs = None
    if with_prompt_logprobs:
        prompt_logprobs = [
            None if e is None else {str(t): {"logprob": lp, "rank": r, "decoded_token": None} for t, lp, r in e}
            for e in positions
        ]
    logprobs = None if body.logprobs is None else completion_logprobs(tokens, entries, body.logprobs)
    return {
        "index": index,
        "text": "",
        "logprobs": logprobs,
        "finish_reason": finish,
        "stop_reason": None,
        "prompt_logprobs": prompt_logprobs,
    }


def completion_logprobs(tokens: list[int], entries: list, k: int) -> dict:
    """OpenAI's `logprobs` object: per token its log-prob and the first k + 1 of its entries."""
    names = [token_name(t) for t in tokens]
    offsets = [0, *itertools.accumulate(map(len, names))][: len(names)]
    return {
        "text_offset": offsets,
        "token_logprobs": [None if e is None else e[0][1] for e in entries],
        "tokens": names,
        "top_logprobs": [None if e is None else {token_name(t): lp for t, lp, _ in e[: k + 1]} for e in entries],
    }

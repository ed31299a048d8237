"""Evaluation on held-out prompts: the reverse KL to the teacher always, accuracy when a verifier is given.

    reverse_kl = mean over response tokens of K1 = log p_S(y_t) - log p_T(y_t), y ~ p_S (temperature 1)
    accuracy[set] = mean verifier score of the student's greedy responses to the set's prompts

Eval sets and the KL prompts come from the prompt source (toy: one set a task; files: one a file, or the held-out
share of train); the verifier is `eval.verifier` (auto: the source's default).
"""

from __future__ import annotations

import torch

from trainer.config import TrainConfig
from trainer.data.source import PromptSource
from trainer.data.verifiers import Verifier
from trainer.models import autocast_dtype
from trainer.rollout.sampling import sample_in_batches
from tropd.errors import UserError

EVAL_SEED = 1234


def pick_verifier(config: TrainConfig, source: PromptSource) -> Verifier | None:
    """The configured verifier, or None (reverse KL only)."""
    spec = config.eval.verifier
    if spec == "auto":
        spec = source.default_verifier()
    if spec == "none":
        return None
    own = source.verifiers()
    if spec in own:
        return own[spec]
    if spec == "toy":
        raise UserError("eval.verifier toy checks the toy tasks: use it with data.source=toy")
    if spec in ("exact", "math") and config.data.source == "toy":
        raise UserError(f"eval.verifier {spec} reads each record's answer, which toy prompts lack: use toy or auto")
    from trainer.data.verifiers import load_verifier

    return load_verifier(spec)


@torch.no_grad()
def evaluate(
    model, link, source: PromptSource, config: TrainConfig, verifier: Verifier | None, student_lp, all_done=None
) -> dict:
    """{"accuracy": {set: share}, "reverse_kl": nats/token}; `student_lp(prompts, responses)` gives the student's
    log-probs of the responses (B_T, on CPU); `all_done` keeps sharded ranks decoding in lockstep (see `sample`)."""
    was_training = model.training
    model.eval()
    budget = config.eval.max_new_tokens or config.rollout.max_new_tokens
    # batches bounded in KV-cache tokens, as the rollouts' (`rollout.sample_batch_tokens`), under the same autocast
    stops = dict(stop_ids=source.stop_ids, pad_id=source.pad_id, banned_ids=source.banned_ids,
                 vocab_limit=source.vocab_limit, all_done=all_done, max_new_tokens=budget,
                 batch_tokens=config.rollout.sample_batch_tokens, autocast_dtype=autocast_dtype(config))  # fmt: skip
    accuracy = {}
    if verifier is not None:
        for name, prompts in source.eval_sets(config.eval).items():
            responses = sample_in_batches(model, [p.ids for p in prompts], temperature=0.0, **stops)
            texts = [source.decode(r) for r in responses]
            scores = [float(verifier(t, p.answer, p.record)) for t, p in zip(texts, prompts, strict=True)]
            accuracy[name] = sum(scores) / max(1, len(scores))
    prompts = [p.ids for p in source.kl_prompts(config.eval)]
    responses = sample_in_batches(model, prompts, generator=torch.Generator().manual_seed(EVAL_SEED), **stops)
    s_lp = student_lp(prompts, responses)
    scored = link.score([p + r for p, r in zip(prompts, responses, strict=True)], [len(p) for p in prompts], 0)
    t_lp = torch.zeros_like(s_lp)
    mask = torch.zeros_like(s_lp, dtype=torch.bool)
    for i, r in enumerate(scored.result()):
        t_lp[i, : len(r.logprobs)] = torch.from_numpy(r.logprobs)
        mask[i, : len(responses[i])] = True
    model.train(was_training)
    d = (s_lp - t_lp)[mask]
    return {"accuracy": accuracy, "reverse_kl": float(d.mean()) if d.numel() else float("nan")}

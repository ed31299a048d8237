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
from trainer.pipeline import teacher_context
from trainer.rollout.decode import resolve_compile
from trainer.rollout.sampling import batch_rows, sample
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


def spread(rows: list[slice], rank: int, world: int) -> list[list[int]]:
    """This rank's row numbers in each of the global batches `rows`: every `world`-th row from `rank` on, padded
    with the batch's first row to the same count on every rank (a padding row is sampled again and counted once),
    so that every rank makes the same calls with as many rows (sharded ranks run each forward together)."""
    mine = []
    for batch in rows:
        share = list(range(batch.start, batch.stop))[rank::world]
        width = -(-(batch.stop - batch.start) // world)
        mine.append(share + [batch.start] * (width - len(share)))
    return mine


@torch.no_grad()
def evaluate(
    model, link, source: PromptSource, config: TrainConfig, verifier: Verifier | None, student_lp, dp=None, engine=None
) -> dict | None:
    """{"accuracy": {set: share}, "reverse_kl": nats/token} on rank 0, None on the others. `student_lp(prompts,
    responses)` gives the student's log-probs of the responses (B_T, on CPU). With `dp` (a `DataParallel` of
    several ranks) the prompts are spread over the ranks, each sampling, scoring and verifying its share of every
    batch, and rank 0 gathers the results: the same numbers as one process (every row is sampled from its own
    draws); sharded ranks decode in lockstep (see `sample`). `engine` (a synced `VLLMRollout`), when given, samples
    instead of `sample`, each row with its own seed."""
    rank, world = (dp.rank, dp.world) if dp is not None else (0, 1)
    was_training = model.training
    model.eval()
    budget = config.eval.max_new_tokens or config.rollout.max_new_tokens
    bound = config.rollout.sample_batch_tokens
    # batches bounded in KV-cache tokens, as the rollouts' (`rollout.sample_batch_tokens`), under the same autocast
    stops = dict(stop_ids=source.stop_ids, pad_id=source.pad_id, banned_ids=source.banned_ids,
                 vocab_limit=source.vocab_limit, all_done=dp.all_true if dp is not None and dp.sharded else None,
                 max_new_tokens=budget, autocast_dtype=autocast_dtype(config),
                 compiled=resolve_compile(config.rollout.compile, model))  # fmt: skip

    def run(ids: list[list[int]], uniforms_B_T: torch.Tensor | None) -> list[tuple[int, list[int]]]:
        """This rank's (row number, response)s: global batches of `bound` x world tokens, a share each."""
        responses: list[tuple[int, list[int]]] = []
        temperature = 0.0 if uniforms_B_T is None else 1.0
        for rows in spread(batch_rows(ids, budget, bound * world), rank, world):
            starts = [ids[i] for i in rows]
            if engine is not None:
                seeds = [EVAL_SEED * 1_000_003 + i for i in rows]
                out, _ = engine.sample(starts, max_new_tokens=budget, temperature=temperature, top_p=1.0,
                                       stop_ids=source.stop_ids, seeds=seeds, banned_ids=source.banned_ids,
                                       vocab_limit=source.vocab_limit)  # fmt: skip
            else:
                u_B_T = None if uniforms_B_T is None else uniforms_B_T[rows]
                out = sample(model, starts, temperature=temperature, uniforms_B_T=u_B_T, **stops).responses()
            responses += zip(rows, out, strict=True)
        return responses

    correct: dict[str, dict[int, float]] = {}
    if verifier is not None:
        for name, prompts in source.eval_sets(config.eval).items():
            correct[name] = {i: float(verifier(source.decode(r), prompts[i].answer, prompts[i].record))
                             for i, r in run([p.ids for p in prompts], None)}  # fmt: skip
    held = source.kl_prompts(config.eval)
    prompts = [p.ids for p in held]
    uniforms = torch.rand((len(prompts), budget), generator=torch.Generator().manual_seed(EVAL_SEED))
    rows, responses = zip(*run(prompts, uniforms), strict=True)
    mine = [prompts[i] for i in rows]
    s_lp = student_lp(mine, list(responses))
    # each response scored by its prompt's teacher, after that teacher's context (a record's teacher_messages)
    contexts = [teacher_context(held[i]) for i in rows]
    scored = link.score([c + r for c, r in zip(contexts, responses, strict=True)], [len(c) for c in contexts], 0,
                        [held[i].teacher for i in rows])  # fmt: skip
    t_lp = torch.zeros_like(s_lp)
    mask = torch.zeros_like(s_lp, dtype=torch.bool)
    for i, r in enumerate(scored.result()):
        t_lp[i, : len(r.logprobs)] = torch.from_numpy(r.logprobs)
        mask[i, : len(responses[i])] = True
    model.train(was_training)
    if engine is not None:
        engine.sleep()
    kl = {row: (s_lp[i] - t_lp[i])[mask[i]].double() for i, row in enumerate(rows)}
    parts = dp.gather((correct, kl)) if dp is not None and world > 1 else [(correct, kl)]
    if parts is None:
        return None
    accuracy = {}
    for name in correct:
        scores = {i: s for c, _ in parts for i, s in c[name].items()}  # a row sampled twice counts once
        accuracy[name] = sum(scores.values()) / max(1, len(scores))
    d = {i: v for _, k in parts for i, v in k.items()}
    result = {"accuracy": accuracy, "reverse_kl": _mean_kl(d.values())}
    if link.named:  # several teachers: each one's reverse KL on its own prompts too
        names = {i: link.name_of(p.teacher) for i, p in enumerate(held)}
        result["reverse_kl_by_teacher"] = {name: _mean_kl(v for i, v in d.items() if names[i] == name)
                                           for name in dict.fromkeys(names.values())}  # fmt: skip
    return result


def _mean_kl(per_row) -> float:
    """Mean over the tokens of every row (per-row float64 tensors of K1)."""
    rows = list(per_row)
    tokens = sum(v.numel() for v in rows)
    return float(sum(v.sum() for v in rows) / tokens) if tokens else float("nan")

"""Rollouts and their teacher scores, as batches ready for a loss.

`Rollouts.make(step)` draws prompts, asks the teacher for draft prefixes where guidance applies, samples
the student, and submits the scoring request without waiting for it; `Pending.resolve()` waits for the
scores and returns padded tensors. The trainer keeps up to `max_staleness + 1` batches in flight, so the
teacher scores batch k+1 while the optimizer works on batch k.
"""

from __future__ import annotations

import math
import random
from concurrent.futures import Future
from dataclasses import dataclass, fields

import torch

from trainer.config import TrainConfig
from trainer.data.source import Prompt, PromptSource
from trainer.methods import method_of
from trainer.models import autocast_dtype
from trainer.rollout.decode import resolve_compile
from trainer.rollout.sampling import sample_in_batches


@dataclass
class Batch:
    """One step's data. Response tensors are right-padded to T; K is the teacher's top-k."""

    step: int
    source: str  # "student" (on-policy samples) or "teacher" (teacher-written responses)
    prompts: list[list[int]]
    responses: list[list[int]]
    prefix_lens: list[int]
    ids_B_T: torch.Tensor
    mask_B_T: torch.Tensor
    prefix_mask_B_T: torch.Tensor
    old_lp_B_T: torch.Tensor | None
    teacher_lp_B_T: torch.Tensor | None = None
    sampler_lp_B_T: torch.Tensor | None = None  # the rollout engine's log-prob of each token it sampled (vllm; 0 else)
    teacher_top_ids_B_T_K: torch.Tensor | None = None
    teacher_top_lp_B_T_K: torch.Tensor | None = None
    teachers: list[str] | None = None  # the name of each row's teacher

    @property
    def tokens(self) -> int:
        return int(self.mask_B_T.sum())


@dataclass
class Pending:
    batch: Batch
    scores: Future | None
    top_k: int

    def resolve(self) -> Batch:
        if self.scores is not None:
            fill_teacher(self.batch, self.scores.result(), self.top_k)
            self.scores = None
        return self.batch

    def saved(self) -> dict:
        """The batch with its teacher scores, as plain CPU data for a checkpoint (waits for the scores)."""
        batch = self.resolve()
        return {
            name: value.cpu() if isinstance(value, torch.Tensor) else value
            for name, value in ((f.name, getattr(batch, f.name)) for f in fields(batch))
        }

    @classmethod
    def restored(cls, saved: dict, top_k: int) -> Pending:
        return cls(Batch(**saved), None, top_k)


def pad(rows: list[list], value, dtype) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(r, dtype=dtype)
    return out


def fill_teacher(batch: Batch, results, top_k: int) -> None:
    """Padded teacher tensors from per-sequence results (log-probs of the response tokens, top-k)."""
    B, T = batch.ids_B_T.shape
    lp = torch.zeros((B, T), dtype=torch.float32)
    top_ids = torch.zeros((B, T, top_k), dtype=torch.long)
    top_lp = torch.full((B, T, top_k), -1e4, dtype=torch.float32)  # padding only; masked out
    for i, r in enumerate(results):
        n = len(r.logprobs)
        lp[i, :n] = torch.from_numpy(r.logprobs)
        if top_k:
            top_ids[i, :n] = torch.from_numpy(r.top_ids[:, :top_k]).long()
            top_lp[i, :n] = torch.from_numpy(r.top_logprobs[:, :top_k])
    batch.teacher_lp_B_T, batch.teacher_top_ids_B_T_K, batch.teacher_top_lp_B_T_K = lp, top_ids, top_lp


def prefix_share(config: TrainConfig, step: int) -> float:
    """Share of prompts that get a teacher prefix. Schedule `share`: prompt_share * max(0, 1 - step / decay_steps);
    `length`: prompt_share while the maximum prefix length (`prefix_length`) is above zero, then 0."""
    g = config.guidance
    if not (method_of(config).guidance and g.enabled):
        return 0.0
    if g.schedule == "length":
        return g.prompt_share if prefix_length(config, step) > 0 else 0.0
    return g.prompt_share * max(0.0, 1.0 - step / g.decay_steps)


def prefix_length(config: TrainConfig, step: int) -> int:
    """Most teacher-draft tokens in a prefix at `step`. Schedule `length`: the cosine anneal
    round(prefix_tokens * (1 + cos(pi * min(1, step / decay_steps))) / 2), prefix_tokens at step 0 and 0 from
    decay_steps on; `share`: prefix_tokens (each prefix then takes a length drawn in 1..prefix_tokens)."""
    g = config.guidance
    if g.schedule == "share":
        return g.prefix_tokens
    return round(g.prefix_tokens * (1 + math.cos(math.pi * min(1.0, step / g.decay_steps))) / 2)


class Rollouts:
    """Every rank draws the same global batch (prompts, uniforms, teacher drafts) and keeps its slice, so
    that `world` data-parallel ranks together see exactly what one process would."""

    def __init__(
        self,
        config: TrainConfig,
        model,
        link,
        source: PromptSource,
        old_logprobs=None,
        rank: int = 0,
        world: int = 1,
        all_done=None,
        engine=None,
        trained=None,
    ):
        self.config, self.model, self.link, self.source = config, model, link, source
        # rollout.engine=vllm: the engine samples; its weights are those of `trained` (the causal LM itself, of which
        # `model` may be a view: FSDP's) as of `synced_version`
        self.engine, self.trained = engine, trained if trained is not None else model
        self.weights_version, self.synced_version, self.sync_s = 0, -1, 0.0
        self.old_logprobs = old_logprobs  # (prompts, responses) -> log-probs B_T of the sampling student
        self.all_done = all_done  # sharded ranks decode in lockstep (see `sample`)
        self.rank, self.world = rank, world
        self.rng = random.Random(f"prompts/{config.seed}")
        self.gen = torch.Generator().manual_seed(config.seed)
        self.method = method_of(config)
        self.top_k = config.top_k() if self.method.top_k else 0

    # the data cursor: everything that decides which prompts and samples come next
    def state(self) -> dict:
        return {"rng": self.rng.getstate(), "gen": self.gen.get_state()}

    def load_state(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.gen.set_state(state["gen"])

    def weights_moved(self) -> None:
        """The trainer changed the weights (an optimizer step): the engine is stale until its next sync."""
        self.weights_version += 1

    def sync_engine(self) -> None:
        """Copy the trainer's weights into the rollout engine unless it has them already (seconds in `sync_s`)."""
        if self.engine is not None and self.synced_version != self.weights_version:
            self.sync_s += self.engine.sync(self.trained)
            self.synced_version = self.weights_version

    def _prompts(self) -> list[Prompt]:
        r = self.config.rollout
        drawn = self.source.draw(self.rng, r.prompts_per_step)
        return [p for p in drawn for _ in range(r.samples_per_prompt)]

    def _mine(self, rows: list) -> list:
        n = len(rows) // self.world
        return rows[self.rank * n : (self.rank + 1) * n]

    def make(self, step: int) -> Pending:
        cfg = self.config
        drawn = self._prompts()
        written = self.method.teacher_written
        if written == "always" or (written == "drawn" and self.rng.random() >= cfg.loss.on_policy_share):
            return self._teacher_written(step, drawn)
        budget = cfg.rollout.max_new_tokens
        uniforms = self._mine(torch.rand((len(drawn), budget), generator=self.gen))
        rows = self._mine(list(range(len(drawn))))  # this rank's rows' numbers in the global batch
        prefixes = self._mine(self._prefixes(step, drawn))
        drawn = self._mine(drawn)
        prompts = [list(p.ids) for p in drawn]
        starts = [p + x for p, x in zip(prompts, prefixes, strict=True)]
        was_training = self.model.training
        self.model.eval()
        sampler_lp = None
        if self.engine is None:
            continuations = self._sample(starts, budget, uniforms)
        else:
            continuations, sampler_lp = self._sample_on_engine(step, starts, budget, rows)
        stale = self.engine is not None and self.synced_version != self.weights_version
        # a prefix plus its continuation never runs past the response budget
        cut = [max(budget, len(x) + 1) for x in prefixes]
        responses = [(x + c)[:n] for x, c, n in zip(prefixes, continuations, cut, strict=True)]
        batch = self._batch(step, "student", drawn, responses, [len(x) for x in prefixes])
        if sampler_lp is not None:
            padded = [([0.0] * len(x) + lp)[:n] for x, lp, n in zip(prefixes, sampler_lp, cut, strict=True)]
            batch.sampler_lp_B_T = pad(padded, 0.0, torch.float32)
        if cfg.max_staleness > 0 or stale:
            # the old policy's log-probs: the engine's where it sampled; a teacher prefix's tokens were not sampled
            # by it, so a batch with prefixes takes one more forward of the trainer's for them (as without an engine)
            if sampler_lp is not None and not bool(batch.prefix_mask_B_T.any()):
                batch.old_lp_B_T = batch.sampler_lp_B_T.clone()
            else:
                batch.old_lp_B_T = self.old_logprobs(prompts, responses)
                if sampler_lp is not None:
                    batch.old_lp_B_T = torch.where(batch.prefix_mask_B_T, batch.old_lp_B_T, batch.sampler_lp_B_T)
        self.model.train(was_training)
        # the teacher scores each response after its own context (a record's teacher_messages), else the prompt
        contexts = [teacher_context(p) for p in drawn]
        seqs = [c + r for c, r in zip(contexts, responses, strict=True)]
        future = self.link.score(seqs, [len(c) for c in contexts], self.top_k, batch.teachers)
        return Pending(batch, future, self.top_k)

    def _sample(self, starts: list[list[int]], budget: int, uniforms_B_T: torch.Tensor) -> list[list[int]]:
        """Student samples of `starts`, in batches of at most `rollout.sample_batch_tokens` KV-cache tokens."""
        src, r = self.source, self.config.rollout
        return sample_in_batches(
            self.model, starts, max_new_tokens=budget, batch_tokens=r.sample_batch_tokens, stop_ids=src.stop_ids,
            pad_id=src.pad_id, banned_ids=src.banned_ids, vocab_limit=src.vocab_limit, temperature=r.temperature,
            top_p=r.top_p, uniforms_B_T=uniforms_B_T, all_done=self.all_done,
            autocast_dtype=autocast_dtype(self.config), compiled=resolve_compile(r.compile, self.model),
        )  # fmt: skip

    def _sample_on_engine(self, step: int, starts: list[list[int]], budget: int, rows: list[int]):
        """(continuations, the engine's log-probs of their tokens), each row with its own seed from (run seed, step,
        row), so that a row's sample does not depend on its batch or rank. The engine syncs first when due (every
        `rollout.sync_every` steps, and always on the first), and sleeps after (on CUDA)."""
        r, src = self.config.rollout, self.source
        if self.synced_version < 0 or (step - 1) % r.sync_every == 0:
            self.sync_engine()
        seeds = [(self._seed(step) * 1_000_003 + row) % 2**63 for row in rows]
        out = self.engine.sample(starts, max_new_tokens=budget, temperature=r.temperature, top_p=r.top_p,
                                 stop_ids=src.stop_ids, seeds=seeds, banned_ids=src.banned_ids,
                                 vocab_limit=src.vocab_limit)  # fmt: skip
        self.engine.sleep()
        return out

    def _prefixes(self, step: int, prompts: list[Prompt]) -> list[list[int]]:
        share = prefix_share(self.config, step)
        chosen = [i for i in range(len(prompts)) if self.rng.random() < share]
        prefixes: list[list[int]] = [[] for _ in prompts]
        if not chosen:
            return prefixes
        longest = prefix_length(self.config, step)
        by_length = self.config.guidance.schedule == "length"
        stops = self.source.stop_ids
        drafts = self.link.continue_(
            [teacher_context(prompts[i]) for i in chosen], longest, [prompts[i].teacher for i in chosen],
            temperature=1.0, seed=self._seed(step), top_k=0, stop_ids=list(stops),
        ).result()  # fmt: skip
        for i, d in zip(chosen, drafts, strict=True):
            tokens = d.token_ids.tolist()
            ends = [j for j, t in enumerate(tokens) if t in stops]
            if ends:  # a prefix holds no stop id: the student writes the rest
                tokens = tokens[: ends[0]]
            prefixes[i] = tokens[: longest if by_length else self.rng.randint(1, longest)] if tokens else []
        return prefixes

    def _teacher_written(self, step: int, prompts: list[Prompt]) -> Pending:
        """Teacher drafts as the whole response (sft, and gkd's off-policy batches), each after its teacher's context;
        the student trains on them after its own prompt."""
        k = self.top_k
        stops = self.source.stop_ids
        drafts = self._mine(
            self.link.continue_(
                [teacher_context(p) for p in prompts], self.config.rollout.max_new_tokens,
                [p.teacher for p in prompts], temperature=1.0, seed=self._seed(step), top_k=k, stop_ids=list(stops),
            ).result()
        )  # fmt: skip
        prompts = self._mine(prompts)
        responses = [d.token_ids.tolist() or [stops[0]] for d in drafts]
        batch = self._batch(step, "teacher", prompts, responses, [0] * len(prompts))
        fill_teacher(batch, drafts, k)
        return Pending(batch, None, k)

    def _seed(self, step: int) -> int:
        return (self.config.seed * 1_000_003 + step) % (2**31)

    def _batch(self, step, source, drawn: list[Prompt], responses, prefix_lens) -> Batch:
        prompts = [list(p.ids) for p in drawn]
        ids = pad(responses, self.source.pad_id, torch.long)
        mask = pad([[True] * len(r) for r in responses], False, torch.bool)
        prefix = pad(
            [[j < n for j in range(len(r))] for r, n in zip(responses, prefix_lens, strict=True)], False, torch.bool
        )
        batch = Batch(step, source, prompts, responses, prefix_lens, ids, mask, prefix & mask, None)
        batch.teachers = [self.link.name_of(p.teacher) for p in drawn]
        return batch


def teacher_context(prompt: Prompt) -> list[int]:
    """What the teacher reads before a response: the record's teacher-only context, else the student's prompt."""
    return list(prompt.teacher_ids if prompt.teacher_ids is not None else prompt.ids)


def k1_estimate(student_lp_B_T: torch.Tensor, teacher_lp_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> float:
    d = (student_lp_B_T - teacher_lp_B_T)[mask_B_T]
    return float(d.mean()) if d.numel() else math.nan

"""The transformers (`hf`) engine of the teacher service: the reference and the fallback.

An engine scores token sequences and continues prefixes, returning numpy arrays; it never detokenises.
The service's batcher calls it from one worker thread, so engines need not be thread-safe.
"""

from __future__ import annotations

import inspect

import numpy as np

from services.teacher.engines.types import Continued, SamplingSpec, Scored, ScoreItem, describe, join_scored

LOGITS_BUDGET_BYTES = 256 * 2**20  # float32 logits of one scoring group


def logit_groups(items: list[ScoreItem], vocab: int) -> list[list[ScoreItem]]:
    """Consecutive groups whose scored positions' float32 logits, rows x (longest - earliest start + 1) x vocab,
    fit LOGITS_BUDGET_BYTES; an item over it alone is a group of its own."""
    groups: list[list[ScoreItem]] = []
    group: list[ScoreItem] = []
    for it in items:
        trial = [*group, it]
        kept = max(len(x.ids) for x in trial) - min(x.start for x in trial) + 1
        if group and len(trial) * kept * vocab * 4 > LOGITS_BUDGET_BYTES:
            groups.append(group)
            trial = [it]
        group = trial
    return [*groups, group] if group else groups


class HFEngine:
    """The reference engine: a transformers forward pass, float32 by default, on CPU or one GPU."""

    name = "hf"
    # one generator per engine call draws every row's tokens: a seeded draft depends on the call's other prefixes, so
    # the batcher runs a continuation request alone, whole (services/teacher/batching.py)
    batch_invariant_drafts = False

    def __init__(self, model_dir: str, dtype: str = "float32", device: str | None = None):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        config = AutoConfig.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(self.device)
        self.model.eval()
        self.keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        max_len = getattr(config, "max_position_embeddings", None) or 2048
        self.info = describe(model_dir, "hf", dtype, config.vocab_size, max_len, config.eos_token_id)

    def score(self, items: list[ScoreItem]) -> list[Scored]:
        """The items in groups whose float32 logits, of the scored positions only, fit LOGITS_BUDGET_BYTES (a
        151,936-token vocabulary makes every position's logits of a batch of long prompts tens of GB)."""
        out: list[Scored] = []
        for group in logit_groups(items, self.info.vocab_size):
            out += self._score(group)
        return out

    def _score(self, items: list[ScoreItem]) -> list[Scored]:
        torch = self.torch
        width = max(len(it.ids) for it in items)
        first = min(it.start for it in items) - 1  # the first position whose logits a score needs
        ids = torch.zeros((len(items), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, it in enumerate(items):
            ids[i, : len(it.ids)] = torch.tensor(it.ids)
            attn[i, : len(it.ids)] = 1
        keep = {"logits_to_keep": width - first} if self.keeps_logits else {}
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device), **keep).logits
            offset = first if keep else 0  # logits[:, j] is position j + offset
            # row p predicts token p + 1: rows start-1 .. n-2 score tokens start .. n-1
            return [
                self._scored_rows(logits[i, it.start - 1 - offset : len(it.ids) - 1 - offset], it.ids[it.start :], it)
                for i, it in enumerate(items)
            ]

    def score_chunk(self, item: ScoreItem, begin: int, end: int, cache=None):
        """Positions `begin` .. `end` - 1 of `item`, run over `cache` (the keys and values of positions before
        `begin`, as the previous chunk returned them; None for the first): (the cache through `end`, the scores
        of the scored tokens these positions predict). The scores of a sequence's chunks, in order and joined
        (`join_scored`), are its scores whole, to float rounding. The batcher scores a long sequence so, between
        other clients' batches, while clients compete (services/teacher/batching.py). Positions that score a token
        run in pieces whose logits fit LOGITS_BUDGET_BYTES; those before them in one."""
        torch = self.torch
        step = max(1, LOGITS_BUDGET_BYTES // (4 * self.info.vocab_size))
        # positions before start - 1 predict no scored token: one piece, keeping one position's logits
        quiet = min(end, item.start - 1) if self.keeps_logits else begin
        bounds = [(begin, quiet)] if quiet > begin else []
        bounds += [(lo, min(lo + step, end)) for lo in range(max(begin, quiet), end, step)]
        pieces = []
        with torch.inference_mode():
            for lo, hi in bounds:
                # position p predicts token p + 1; the scored tokens are start .. n-1
                first, last = max(lo, item.start - 1), min(hi, len(item.ids) - 1)
                keep = max(1, hi - first)  # the logits of positions first .. hi-1 (of one, when none is scored)
                ids = torch.tensor([item.ids[lo:hi]], device=self.device)
                kept = {"logits_to_keep": keep} if self.keeps_logits else {}
                out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, **kept)
                cache = out.past_key_values
                if first < last:
                    rows = out.logits[0, -keep:] if kept else out.logits[0, first - lo :]
                    rows = rows[: last - first]
                    pieces.append(self._scored_rows(rows, item.ids[first + 1 : last + 1], item))
        return cache, join_scored(pieces, item.top_k, item.ranks)

    def _scored_rows(self, rows, target: list[int], it: ScoreItem) -> Scored:
        """The scores of `target` from the logits `rows` that predict them, at the item's temperature."""
        torch = self.torch
        rows = rows.float()
        logp = torch.log_softmax(rows if it.temperature == 1 else rows / it.temperature, dim=-1)
        chosen = logp.gather(-1, torch.tensor(target, device=self.device)[:, None]).squeeze(-1)
        top_lp, top_ids = logp.topk(it.top_k, dim=-1) if it.top_k else (logp[:, :0], logp[:, :0].long())
        # vLLM's rank: how many tokens are at least as likely as the scored one
        ranks = (logp >= chosen[:, None]).sum(-1) if it.ranks else None
        return _scored(chosen, top_ids, top_lp, ranks)

    def generate(self, prefixes: list[list[int]], spec: SamplingSpec) -> list[Continued]:
        torch = self.torch
        gen = torch.Generator(device=self.device)
        gen.manual_seed(spec.seed if spec.seed is not None else int(torch.seed() % 2**63))
        stops = set(spec.stop_ids) | set(self.info.stop_ids)
        width = max(len(p) for p in prefixes)
        B = len(prefixes)
        ids = torch.zeros((B, width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prefixes):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        done = [False] * B
        rows: list[list[tuple[int, float, list[int], list[float]]]] = [[] for _ in range(B)]
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            next_pos = pos[:, -1:] + 1
            for _ in range(spec.max_tokens):
                logits = out.logits[:, -1, :].float()
                logp = torch.log_softmax(logits, dim=-1)  # reported at temperature 1, as scoring is
                if spec.temperature == 0:
                    tok = logits.argmax(-1)
                else:
                    # shifted so that the top logit is 0, and a temperature float32 holds: a tiny one then gives
                    # -inf below the top, never inf - inf or 0 / 0
                    temperature = max(spec.temperature, torch.finfo(torch.float32).tiny)
                    scaled = (logits - logits.amax(-1, keepdim=True)) / temperature
                    tok = torch.multinomial(_top_p_probs(scaled, spec.top_p), 1, generator=gen)[:, 0]
                top_lp, top_ids = logp.topk(spec.top_k, dim=-1) if spec.top_k else (logp[:, :0], logp[:, :0].long())
                chosen = logp.gather(-1, tok[:, None])[:, 0]
                for i in range(B):
                    if not done[i]:
                        t = int(tok[i])
                        rows[i].append((t, float(chosen[i]), top_ids[i].tolist(), top_lp[i].tolist()))
                        done[i] = t in stops
                if all(done):
                    break
                mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=self.device)], dim=-1)
                out = self.model(
                    input_ids=tok[:, None],
                    attention_mask=mask,
                    position_ids=next_pos,
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
                next_pos = next_pos + 1
        return [_continued(r, spec.top_k, d) for r, d in zip(rows, done, strict=True)]

    def close(self) -> None:
        return None


def _top_p_probs(logits, top_p: float):
    import torch

    probs = torch.softmax(logits, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
    drop[..., 0] = False  # the most likely token always stays: a top_p below float32's smallest is 0 there
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def _scored(chosen, top_ids, top_lp, ranks=None) -> Scored:
    return Scored(
        chosen.cpu().numpy().astype(np.float32),
        top_ids.cpu().numpy().astype(np.int32),
        top_lp.cpu().numpy().astype(np.float32),
        None if ranks is None else ranks.cpu().numpy().astype(np.int32),
    )


def _continued(rows, k: int, stopped: bool) -> Continued:
    n = len(rows)
    return Continued(
        np.array([r[0] for r in rows], dtype=np.int32),
        np.array([r[1] for r in rows], dtype=np.float32),
        np.array([r[2] for r in rows], dtype=np.int32).reshape(n, k),
        np.array([r[3] for r in rows], dtype=np.float32).reshape(n, k),
        "stop" if stopped else "length",
    )

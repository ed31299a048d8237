"""The training methods: one entry each, holding every fact the trainer needs about a method.

Config validation, the rollout pipeline and the loss dispatch read this table; adding a method is one loss
function in `trainer/losses.py` and one `Method` here (its name then becomes a valid `loss.method`):

    "mine": Method(lambda c, b, scores, step, u: losses.mine(scores, b.ids_B_T, b.teacher_lp_B_T, b.mask_B_T),
                   top_k=False),

The loss functions' formulas are in their docstrings (and in docs/design.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from trainer import losses

if TYPE_CHECKING:
    from trainer.config import LossConfig, TrainConfig
    from trainer.pipeline import Batch

# (config, batch, student scores, step, stochastic-rule uniforms or None) -> (loss, metrics)
LossCall = Callable[["TrainConfig", "Batch", object, int, object], tuple]


@dataclass(frozen=True)
class Method:
    loss: LossCall
    top_k: bool  # the loss reads the teacher's top-k at every response position
    guidance: bool = False  # teacher-written prefixes of student responses (guidance.*)
    # batches the teacher writes whole: never, always, or drawn (when a draw is >= loss.on_policy_share)
    teacher_written: Literal["never", "always", "drawn"] = "never"
    entropy: bool = False  # the loss reads the student's entropy at every position
    argmax: bool = False  # the loss reads the student's argmax (token accuracy)
    uniforms: Callable[[LossConfig], bool] = lambda _loss: False  # draws U(0,1) per token (stochastic rule)

    def needs_drafts(self, config: TrainConfig) -> bool:
        """Whether the teacher must write text (/v1/continue): guidance prefixes or whole responses."""
        if self.teacher_written == "drawn":
            return config.loss.on_policy_share < 1
        return self.teacher_written == "always" or (self.guidance and config.guidance.enabled)


def _stale_logprobs(config: TrainConfig, batch: Batch):
    """The sampling student's log-probs for importance ratios, where the rollouts were stale (`max_staleness > 0`,
    or a rollout engine synced every `rollout.sync_every > 1` steps): the pipeline records them then."""
    return batch.old_lp_B_T if batch.source == "student" else None


def is_weights(config: TrainConfig, batch: Batch, scores) -> torch.Tensor | None:
    """Truncated importance sampling of fresh rows a rollout engine sampled: w_t = min(exp(s_t - s_sampler_t),
    rollout.is_clip) on the tokens it sampled, 1 elsewhere (None: off, no engine's log-probs, or stale rows, whose
    clipped surrogate already takes the sampler's log-probs as the old policy's)."""
    if batch.sampler_lp_B_T is None or not config.rollout.is_clip or _stale_logprobs(config, batch) is not None:
        return None
    s_B_T = losses._scores(scores, batch.ids_B_T).lp_B_T.detach().float()
    w_B_T = torch.exp(s_B_T - batch.sampler_lp_B_T.to(s_B_T.device)).clamp(max=config.rollout.is_clip)
    return torch.where(batch.mask_B_T & ~batch.prefix_mask_B_T, w_B_T, 1.0)


def _opd(config, batch, scores, step, uniform):
    c = config.loss
    old = _stale_logprobs(config, batch)
    return losses.opd(scores, batch.ids_B_T, batch.teacher_lp_B_T, batch.mask_B_T, old_lp_B_T=old,
                      ratio_eps=c.ratio_eps, discount=c.discount,
                      is_weight_B_T=is_weights(config, batch, scores))  # fmt: skip


def _tropd(config, batch, scores, step, uniform):
    c, b = config.loss, batch
    return losses.tropd(
        scores, b.ids_B_T, b.teacher_lp_B_T, b.teacher_top_ids_B_T_K, b.teacher_top_lp_B_T_K, b.mask_B_T,
        prefix_mask_B_T=b.prefix_mask_B_T, rule=c.rule, tau=c.tau, quantile=c.quantile, outlier=c.outlier,
        clip_c=c.clip_c, lambda_out=c.lambda_out, lambda_prefix=c.lambda_prefix,
        prefix_loss=config.guidance.prefix_loss, old_lp_B_T=_stale_logprobs(config, b), ratio_eps=c.ratio_eps,
        uniform_B_T=uniform, is_weight_B_T=is_weights(config, b, scores),
    )  # fmt: skip


def _eopd(config, batch, scores, step, uniform):
    c, b = config.loss, batch
    return losses.eopd(
        scores, b.ids_B_T, b.teacher_lp_B_T, b.teacher_top_ids_B_T_K, b.teacher_top_lp_B_T_K, b.mask_B_T,
        entropy_threshold=c.entropy_threshold, lambda_fkl=c.lambda_fkl, old_lp_B_T=_stale_logprobs(config, b),
        ratio_eps=c.ratio_eps, is_weight_B_T=is_weights(config, b, scores),
    )  # fmt: skip


def _reopold(config, batch, scores, step, uniform):
    c, b = config.loss, batch
    refine = step > (c.refine_after if c.refine_after is not None else config.steps // 2)
    return losses.reopold(
        scores, b.ids_B_T, b.teacher_lp_B_T, b.mask_B_T, floor_lambda=c.floor_lambda, token_share=c.token_share,
        refine=refine, old_lp_B_T=_stale_logprobs(config, b), ratio_eps=c.ratio_eps,
        is_weight_B_T=is_weights(config, b, scores),
    )  # fmt: skip


def _topd(config, batch, scores, step, uniform):
    c, b = config.loss, batch
    return losses.topd(scores, b.ids_B_T, b.teacher_lp_B_T, b.mask_B_T, alpha=c.alpha,
                       old_lp_B_T=_stale_logprobs(config, b), ratio_eps=c.ratio_eps,
                       is_weight_B_T=is_weights(config, b, scores))  # fmt: skip


def _gkd(config, batch, scores, step, uniform):
    b = batch
    return losses.gkd(scores, b.teacher_top_ids_B_T_K, b.teacher_top_lp_B_T_K, b.mask_B_T, beta=config.loss.beta)


def _sft(config, batch, scores, step, uniform):
    return losses.sft(scores, batch.ids_B_T, batch.mask_B_T)


METHODS: dict[str, Method] = {
    "opd": Method(_opd, top_k=False),
    "tropd": Method(_tropd, top_k=True, guidance=True, uniforms=lambda loss: loss.rule == "stochastic"),
    "eopd": Method(_eopd, top_k=True),
    "reopold": Method(_reopold, top_k=False, entropy=True),
    "topd": Method(_topd, top_k=False),
    "gkd": Method(_gkd, top_k=True, teacher_written="drawn"),
    "sft": Method(_sft, top_k=False, teacher_written="always", argmax=True),
}


def method_of(config: TrainConfig) -> Method:
    return METHODS[config.loss.method]


def compute_loss(config: TrainConfig, batch: Batch, scores, step: int, uniform_B_T=None) -> tuple:
    """The configured method's (loss, metrics) of `batch`; `scores` is the student's logits or `StudentScores`."""
    return method_of(config).loss(config, batch, scores, step, uniform_B_T)

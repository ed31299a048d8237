"""Chunked, micro-batched student scoring against the plain path: every loss from `model(...).logits` and
`loss.backward()` on the whole batch, versus `StudentStep` over chunks and micro-batches (float64 models)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from trainer import losses
from trainer.losses import StudentScores, student_scores
from trainer.rollout.sampling import response_forward
from trainer.student import ScoringModule, StudentStep, sequence_inputs

TOL = dict(atol=1e-5, rtol=1e-5)
V, K, PAD = 300, 4, 0
SIZES = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster than two competing for the cores with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SIZES))
    else:  # Qwen3 with tied input/output embeddings
        model = Qwen3ForCausalLM(Qwen3Config(**SIZES, head_dim=8, tie_word_embeddings=True))
    return model.double().train()


def batch(seed: int = 0, B: int = 5) -> dict:
    """Prompts and responses of different lengths; teacher scores that are nan off the response mask."""
    g = torch.Generator().manual_seed(seed)
    plen = torch.randint(1, 7, (B,), generator=g).tolist()
    rlen = [9, 3, 1, 6, 8][:B]
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in plen]
    responses = [torch.randint(1, V, (n,), generator=g).tolist() for n in rlen]
    T, mask = max(rlen), torch.arange(max(rlen)) < torch.tensor(rlen)[:, None]
    top_ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    top_lp = torch.log_softmax(2 * torch.randn(B, T, K + 1, generator=g), -1)[..., :K]
    teacher_lp = -math.log(V) + 3 * torch.randn(B, T, generator=g)
    nan = float("nan")
    return dict(
        prompts=prompts, responses=responses, mask=mask, top_ids=top_ids,
        top_lp=top_lp.masked_fill(~mask[..., None], nan), teacher_lp=teacher_lp.masked_fill(~mask, nan),
        old_lp=-math.log(V) + 0.5 * torch.randn(B, T, generator=g), uniform=torch.rand(B, T, generator=g),
        prefix=mask & (torch.arange(T) < 2) & (torch.arange(B) % 2 == 0)[:, None],
    )  # fmt: skip


def methods(b: dict) -> dict:
    """name -> (loss of (student, ids), what the scores need)."""
    t_lp, tops, mask = b["teacher_lp"], (b["top_ids"], b["top_lp"]), b["mask"]
    out = {
        "opd": (lambda s, ids: losses.opd(s, ids, t_lp, mask, old_lp_B_T=b["old_lp"], discount=0.5), {}),
        "eopd": (lambda s, ids: losses.eopd(s, ids, t_lp, *tops, mask, entropy_threshold=1.2), {"top": True}),
        "reopold": (
            lambda s, ids: losses.reopold(
                s, ids, t_lp, mask, floor_lambda=0.2, token_share=0.5, old_lp_B_T=b["old_lp"]
            ),
            {"entropy": True},
        ),  # fmt: skip
        "topd": (lambda s, ids: losses.topd(s, ids, t_lp, mask, alpha=0.2, old_lp_B_T=b["old_lp"]), {}),
        "tropd-sampled-prefix": (
            lambda s, ids: losses.tropd(
                s,
                ids,
                t_lp,
                *tops,
                mask,
                prefix_mask_B_T=b["prefix"],
                prefix_loss="sampled_fkl",
                lambda_prefix=0.001,
                uniform_B_T=b["uniform"],
            ),
            {"top": True},
        ),  # fmt: skip
        "gkd": (lambda s, ids: losses.gkd(s, *tops, mask, beta=0.5), {"top": True}),
        "sft": (lambda s, ids: losses.sft(s, ids, mask), {"argmax": True}),
    }
    for rule in losses.TRUST_RULES:
        for outlier in losses.OUTLIERS:
            kw = dict(prefix_mask_B_T=b["prefix"], rule=rule, outlier=outlier, quantile=0.4, uniform_B_T=b["uniform"])
            out[f"tropd-{rule}-{outlier}"] = (
                lambda s, ids, kw=kw: losses.tropd(s, ids, t_lp, *tops, mask, **kw),
                {"top": True},
            )
    return out


def reference(model, b: dict, loss_fn) -> tuple[torch.Tensor, dict]:
    """The plain path: the model's logits at the response positions, the loss, loss.backward()."""
    model.zero_grad()
    _, mask, logits_B_T_V = response_forward(model, b["prompts"], b["responses"], PAD)
    ids = sequence_inputs(b["prompts"], b["responses"], PAD)[3]
    loss, _ = loss_fn(logits_B_T_V, ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def stepped(module, b, loss_fn, need: dict, micro: int):
    module.zero_grad()
    step = StudentStep(
        module, b["prompts"], b["responses"], PAD, b["top_ids"] if need.get("top") else None,
        micro_batch_sequences=micro, entropy=need.get("entropy", False), argmax=need.get("argmax", False),
    )  # fmt: skip
    assert torch.equal(step.mask_B_T, b["mask"])
    loss, metrics = loss_fn(step.scores(), step.ids_B_T)
    step.backward(loss)
    return loss.detach(), metrics, {n: p.grad.clone() for n, p in module.model.named_parameters()}


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.slow  # over 4 s on 2 cores
def test_every_loss_chunked_and_micro_batched_equals_plain_path(kind):
    model, b = tiny(kind), batch(1)
    for name, (loss_fn, need) in methods(b).items():
        ref_loss, ref_grads = reference(model, b, loss_fn)
        for chunk in (1, 7):
            module = ScoringModule(model, chunk_tokens=chunk)
            for micro in (0, 1, 3):
                loss, metrics, grads = stepped(module, b, loss_fn, need, micro)
                where = f"{kind} {name} chunk={chunk} micro={micro}"
                torch.testing.assert_close(loss.double(), ref_loss.double(), **TOL, msg=where)
                assert all(math.isfinite(v) for v in metrics.values()), where
                for n, g in grads.items():
                    torch.testing.assert_close(g, ref_grads[n], **TOL, msg=f"{where} {n}")
        assert any(g.abs().max() > 0 for g in ref_grads.values()), name


def test_scores_fields_equal_reductions_of_the_logits_and_unchunked_is_the_same():
    model, b = tiny("llama"), batch(2)
    _, mask, logits_B_T_V = response_forward(model, b["prompts"], b["responses"], PAD)
    ids = sequence_inputs(b["prompts"], b["responses"], PAD)[3]
    want = student_scores(logits_B_T_V, ids, b["top_ids"], entropy=True, argmax=True)
    for chunk, micro in ((0, 0), (0, 2), (5, 2)):
        step = StudentStep(ScoringModule(model, chunk), b["prompts"], b["responses"], PAD, b["top_ids"],
                           micro_batch_sequences=micro, entropy=True, argmax=True)  # fmt: skip
        got = step.scores()
        assert got.vocab_size == V and got.lp_B_T.dtype == torch.float32
        assert got.lp_B_T.requires_grad and got.topk_lp_B_T_K1.shape == (*mask.shape, K + 1)
        for field in ("lp_B_T", "topk_lp_B_T_K1", "entropy_B_T"):
            torch.testing.assert_close(getattr(got, field)[mask], getattr(want, field)[mask].detach(), **TOL)
        assert torch.equal(got.argmax_B_T[mask], want.argmax_B_T[mask])


def test_logits_api_equals_scores_api():
    g = torch.Generator().manual_seed(3)
    b = batch(3)
    B, T = b["mask"].shape
    ids = torch.randint(V, (B, T), generator=g)
    for name, (loss_fn, _) in methods(b).items():
        logits = torch.randn(B, T, V, generator=g, dtype=torch.float64).requires_grad_()
        loss_a, metrics_a = loss_fn(logits, ids)
        (grad_a,) = torch.autograd.grad(loss_a, logits)
        scores = student_scores(logits, ids, b["top_ids"], entropy=True, argmax=True)
        loss_b, metrics_b = loss_fn(scores, ids)
        (grad_b,) = torch.autograd.grad(loss_b, logits)
        assert loss_a.item() == loss_b.item() and metrics_a == metrics_b, name
        assert torch.equal(grad_a, grad_b), name
    top = b["top_ids"]
    kl = losses.topk_forward_kl(logits, top, b["top_lp"])
    assert torch.equal(kl, losses.topk_forward_kl(student_scores(logits, None, top), top, b["top_lp"]))


def test_missing_score_fields_raise_a_clear_error():
    b = batch(4)
    B, T = b["mask"].shape
    bare = StudentScores(torch.zeros(B, T), None, None, None, V)
    fns = methods(b)
    for name, field in (("eopd", "topk_lp_B_T_K1"), ("reopold", "entropy_B_T"), ("sft", "argmax_B_T"),
                        ("gkd", "topk_lp_B_T_K1"), ("tropd-threshold-mask", "topk_lp_B_T_K1")):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            fns[name][0](bare, torch.zeros(B, T, dtype=torch.long))
    no_lp = StudentScores(None, torch.zeros(B, T, K + 1), None, None, V)
    with pytest.raises(ValueError, match="opd needs StudentScores.lp_B_T"):
        fns["opd"][0](no_lp, torch.zeros(B, T, dtype=torch.long))


@pytest.mark.parametrize("micro", [0, 2])
def test_backward_none_gives_zero_gradients(micro):
    model, b = tiny("qwen3"), batch(5)
    module = ScoringModule(model, chunk_tokens=4)
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # accumulated from an earlier micro-step: must stay as it is
    step = StudentStep(module, b["prompts"], b["responses"], PAD, b["top_ids"], micro_batch_sequences=micro)
    step.scores()
    step.backward(None)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    with pytest.raises(RuntimeError, match="scores"):
        step.backward(None)


def test_model_without_accessors_is_scored_through_its_logits():
    class Wrapped(torch.nn.Module):  # a causal LM exposing neither get_decoder nor get_output_embeddings
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, **kw):
            return self.inner(**kw)

    model, b = tiny("llama"), batch(6)
    loss_fn, _ = methods(b)["tropd-adaptive-topk_fkl"]
    ref_loss, ref_grads = reference(model, b, loss_fn)
    module = ScoringModule(Wrapped(model), chunk_tokens=3)
    assert module.uses_model_logits and not ScoringModule(model).uses_model_logits
    module.zero_grad()
    step = StudentStep(module, b["prompts"], b["responses"], PAD, b["top_ids"], micro_batch_sequences=2)
    loss, _ = loss_fn(step.scores(), step.ids_B_T)
    step.backward(loss)
    torch.testing.assert_close(loss.double(), ref_loss.double(), **TOL)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], **TOL)


def test_softcapping_and_scaling_from_the_config_are_applied():
    model, b = tiny("llama"), batch(7)
    model.config.final_logit_softcapping, model.config.logits_scaling = 0.5, 2.0
    input_ids, attn, index, targets, mask = sequence_inputs(b["prompts"], b["responses"], PAD)
    raw = model(input_ids=input_ids, attention_mask=attn).logits
    logits = torch.tanh(raw / 2.0 / 0.5) * 0.5
    logits_B_T_V = logits.gather(1, index[:, :, None].expand(-1, -1, V))
    lp_B_T = ScoringModule(model, chunk_tokens=5)(input_ids, attn, index, targets)[0]
    torch.testing.assert_close(lp_B_T[mask], losses.token_logprobs(logits_B_T_V, targets)[mask], **TOL)


def test_autocast_keeps_reductions_in_float32():
    model, b = tiny("llama").float(), batch(8)
    step = StudentStep(ScoringModule(model, chunk_tokens=8), b["prompts"], b["responses"], PAD, b["top_ids"],
                       micro_batch_sequences=2, autocast_dtype=torch.bfloat16)  # fmt: skip
    scores = step.scores()
    assert scores.lp_B_T.dtype == torch.float32 and scores.topk_lp_B_T_K1.dtype == torch.float32
    plain = StudentStep(ScoringModule(model, 0), b["prompts"], b["responses"], PAD).scores()
    mask = step.mask_B_T
    torch.testing.assert_close(scores.lp_B_T[mask], plain.lp_B_T[mask].detach(), atol=0.1, rtol=0.05)
    loss, _ = losses.opd(scores, step.ids_B_T, b["teacher_lp"], mask)
    step.backward(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_ddp_micro_batches_accumulate_the_whole_batch_gradient(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model, b = tiny("llama"), batch(9)
    loss_fn, _ = methods(b)["tropd-adaptive-clip"]
    ref_loss, ref_grads = reference(model, b, loss_fn)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(ScoringModule(model, chunk_tokens=4))
        model.zero_grad()
        step = StudentStep(ddp, b["prompts"], b["responses"], PAD, b["top_ids"], micro_batch_sequences=2)
        loss, _ = loss_fn(step.scores(), step.ids_B_T)
        step.backward(loss)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(loss.double(), ref_loss.double(), **TOL)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], **TOL)


@pytest.mark.slow  # over 4 s on 2 cores
def test_peak_memory_falls_with_chunking():
    from trainer.bench.memory import peak_memory

    report = peak_memory(quick=True, model_logits=False)
    peak, settings = report["peak_memory_mb"], report["settings"]
    logits_mb = settings["sequences"] * settings["response_tokens"] * settings["vocab_size"] * 4 / 2**20
    chunk_mb = min(settings["chunks"]) * settings["vocab_size"] * 4 / 2**20
    # the unchunked step holds the batch's float32 logits (and copies of them), the chunked one a chunk's at a time
    assert peak["unchunked"] - peak[f"chunk_{min(settings['chunks'])}"] > logits_mb - chunk_mb, report

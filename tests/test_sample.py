"""`sampling.sample` on a model the hand-written decoder does not cover (Qwen3, through the library's own forward
and cache): stop ids, vocab limit and banned ids, greedy decoding against the full forward, batch independence,
bfloat16, and the device the model is on."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from trainer.rollout.decode import LibraryDecoder, LlamaDecoder, decoder_for
from trainer.rollout.sampling import batch_rows, blocked_ids, draw, sample, sample_in_batches

VOCAB, LIMIT, PAD = 300, 250, 0


def _qwen3(seed: int = 0) -> Qwen3ForCausalLM:
    """A tiny Qwen3 whose rows at and above LIMIT score high: a sampler that ignored the limit would pick them."""
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[LIMIT:] *= 4.0
    return model


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, LIMIT, (int(k),), generator=g).tolist() for k in torch.randint(2, 10, (n,), generator=g)]


def _uniforms(n: int, width: int, seed: int = 7) -> torch.Tensor:
    return torch.rand((n, width), generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow  # over 4 s on 2 cores
def test_qwen3_samples_through_the_library_decoder_and_never_at_or_above_the_vocab_limit():
    model, prompts = _qwen3(), _prompts(16)
    assert isinstance(decoder_for(model), LibraryDecoder)
    options = dict(max_new_tokens=24, pad_id=PAD, uniforms_B_T=_uniforms(16, 24))
    unlimited = sample(model, prompts, **options)
    assert bool((unlimited.response_ids_B_T >= LIMIT).any())  # the model does favour those rows
    limited = sample(model, prompts, **options, vocab_limit=LIMIT, banned_ids=(5, 6, 7, 10_000))
    ids = torch.cat([torch.tensor(r) for r in limited.responses()])
    assert ids.numel() == 16 * 24
    assert int(ids.max()) < LIMIT
    assert not bool(torch.isin(ids, torch.tensor([5, 6, 7])).any())
    assert bool((limited.logprobs_B_T < 0).all()) and bool(torch.isfinite(limited.logprobs_B_T).all())


@pytest.mark.slow  # over 4 s on 2 cores
def test_rows_stop_at_any_of_the_stop_ids():
    model, prompts = _qwen3(), _prompts(12, seed=1)
    options = dict(max_new_tokens=20, pad_id=PAD, vocab_limit=LIMIT, uniforms_B_T=_uniforms(12, 20))
    free = sample(model, prompts, **options).responses()
    a, b = free[0][3], free[1][5]  # two ids that do occur, so that both stop something
    assert a != b
    stopped = sample(model, prompts, **options, stop_ids=(a, b))
    via_eos = sample(model, prompts, **options, stop_ids=(b,), eos_id=a)
    assert torch.equal(stopped.response_ids_B_T, via_eos.response_ids_B_T)
    ends = set()
    for row, whole, finished, n in zip(
        stopped.responses(), free, stopped.finished_B.tolist(), stopped.lengths_B.tolist(), strict=True
    ):
        first = next((i for i, tok in enumerate(whole) if tok in (a, b)), None)
        assert row == (whole if first is None else whole[: first + 1])  # same draws up to and including the stop
        assert finished == (first is not None) and n == len(row)
        if first is not None:
            ends.add(row[-1])
    assert ends == {a, b}
    width = stopped.response_ids_B_T.shape[1]
    for i, n in enumerate(stopped.lengths_B.tolist()):
        assert stopped.response_ids_B_T[i, n:].eq(PAD).all() and stopped.logprobs_B_T[i, n:].eq(0).all()
    assert width == max(stopped.lengths_B.tolist())


@torch.no_grad()
def _greedy_by_full_forward(model, prompt: list[int], steps: int, banned: tuple[int, ...]):
    """Argmax of the model's full forward over the whole sequence so far, one token at a time (no cache, no
    padding), and its log-prob among the allowed ids."""
    seq, logprobs = list(prompt), []
    for _ in range(steps):
        logits_V = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
        logits_V[LIMIT:] = float("-inf")
        logits_V[list(banned)] = float("-inf")
        tok = int(logits_V.argmax())
        logprobs.append(float(torch.log_softmax(logits_V, -1)[tok]))
        seq.append(tok)
    return seq[len(prompt) :], logprobs


@pytest.mark.slow  # over 4 s on 2 cores
def test_greedy_sampling_is_the_argmax_of_the_full_forward_step_by_step():
    model, prompts = _qwen3(seed=2), _prompts(6, seed=2)
    banned = (11, 12)
    greedy = sample(model, prompts, max_new_tokens=10, pad_id=PAD, vocab_limit=LIMIT, banned_ids=banned,
                    temperature=0.0)  # fmt: skip
    for i, prompt in enumerate(prompts):
        tokens, logprobs = _greedy_by_full_forward(model, prompt, 10, banned)
        assert greedy.response_ids_B_T[i].tolist() == tokens
        torch.testing.assert_close(greedy.logprobs_B_T[i], torch.tensor(logprobs), atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # over 4 s on 2 cores
def test_a_rows_sample_does_not_depend_on_the_other_rows_of_its_batch():
    model, prompts = _qwen3(seed=3), _prompts(10, seed=3)
    uniforms = _uniforms(10, 16, seed=4)
    options = dict(max_new_tokens=16, pad_id=PAD, vocab_limit=LIMIT, stop_ids=(1, 2), top_p=0.9)
    whole = sample(model, prompts, **options, uniforms_B_T=uniforms).responses()
    for rows in ([3], [7, 1], [9, 0, 4, 5]):
        part = sample(model, [prompts[i] for i in rows], **options, uniforms_B_T=uniforms[rows]).responses()
        assert part == [whole[i] for i in rows]
    # with other prompts beside it (another padded width), the same row and draws give the same sample
    others = _prompts(5, seed=9) + [prompts[3]]
    mixed = sample(model, others, **options, uniforms_B_T=torch.cat([_uniforms(5, 16, seed=5), uniforms[[3]]]))
    assert mixed.responses()[-1] == whole[3]


def test_a_bfloat16_model_samples_with_float32_log_probs():
    model, prompts = _qwen3(seed=4).to(torch.bfloat16), _prompts(8, seed=4)
    roll = sample(model, prompts, max_new_tokens=12, pad_id=PAD, vocab_limit=LIMIT, generator=torch.Generator())
    assert roll.logprobs_B_T.dtype == torch.float32 and roll.response_ids_B_T.device.type == "cpu"
    assert int(roll.response_ids_B_T.max()) < LIMIT and bool(torch.isfinite(roll.logprobs_B_T).all())
    greedy = sample(model, prompts[:1], max_new_tokens=1, pad_id=PAD, vocab_limit=LIMIT, temperature=0.0)
    tokens, logprobs = _greedy_by_full_forward(model, prompts[0], 1, ())
    assert greedy.response_ids_B_T[0].tolist() == tokens
    assert abs(float(greedy.logprobs_B_T[0, 0]) - logprobs[0]) < 1e-2


def test_all_done_keeps_decoding_until_every_process_is_done():
    model, prompts = _qwen3(), _prompts(4)
    calls: list[bool] = []
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    roll = sample(model, prompts, max_new_tokens=12, pad_id=PAD, vocab_limit=LIMIT, temperature=0.0, check_every=2,
                  stop_ids=range(LIMIT), all_done=lambda mine: calls.append(mine) or len(calls) >= 5)  # fmt: skip
    assert roll.lengths_B.tolist() == [1, 1, 1, 1]  # every id stops: each row is done after one token
    assert calls == [True] * 5  # asked every 2 tokens, after tokens 2, 4, ..., 10: the others' rows kept it going
    assert len(forwards) == 1 + 9  # the prefill, then a step after each of tokens 1..9
    assert roll.response_ids_B_T.shape[1] == 1  # columns past every row's end are not returned


def test_bad_arguments_are_clear_errors():
    model, prompts = _qwen3(), _prompts(2)
    with pytest.raises(ValueError, match="every id"):
        sample(model, prompts, max_new_tokens=2, pad_id=PAD, vocab_limit=1, banned_ids=(0,))
    with pytest.raises(ValueError, match="uniforms_B_T"):
        sample(model, prompts, max_new_tokens=4, pad_id=PAD, uniforms_B_T=torch.rand(2, 3))
    with pytest.raises(ValueError, match="empty prompt"):
        sample(model, [[]], max_new_tokens=4, pad_id=PAD)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_on_cuda_matches_cpu():
    model, prompts = _qwen3(seed=5), _prompts(8, seed=5)
    uniforms = _uniforms(8, 12)  # on CPU: sample moves them
    options = dict(max_new_tokens=12, pad_id=PAD, vocab_limit=LIMIT, stop_ids=(1, 2), temperature=0.0)
    on_cpu = sample(model, prompts, **options, uniforms_B_T=uniforms)
    on_gpu = sample(model.to("cuda"), prompts, **options, uniforms_B_T=uniforms)
    assert on_gpu.response_ids_B_T.device.type == "cpu" and on_gpu.lengths_B.device.type == "cpu"
    assert torch.equal(on_gpu.response_ids_B_T, on_cpu.response_ids_B_T)
    torch.testing.assert_close(on_gpu.logprobs_B_T, on_cpu.logprobs_B_T, atol=1e-3, rtol=1e-3)


def _reference(model, prompts, *, max_new_tokens, stop_ids=(), banned_ids=(), vocab_limit=None, temperature=1.0,
               top_p=1.0, uniforms_B_T=None):  # fmt: skip
    """The slow, obviously right sampler: one row at a time, a full forward over the whole sequence for every token
    (no cache, no padding, no batch), the same draw from the same uniform. (tokens, log-probs) per row."""
    out = []
    for b, prompt in enumerate(prompts):
        seq, tokens, logprobs = list(prompt), [], []
        for t in range(max_new_tokens):
            with torch.no_grad():
                logits_1_V = model(torch.tensor([seq])).logits[:, -1].float()
            logits_1_V = logits_1_V.masked_fill(blocked_ids(logits_1_V.shape[-1], banned_ids, vocab_limit, "cpu"),
                                                float("-inf"))  # fmt: skip
            u = None if temperature == 0 else uniforms_B_T[b, t : t + 1]
            tok = int(draw(logits_1_V, u, temperature, top_p)[0])
            tokens.append(tok)
            logprobs.append(float(torch.log_softmax(logits_1_V, -1)[0, tok]))
            seq.append(tok)
            if tok in stop_ids:
                break
        out.append((tokens, logprobs))
    return out


def _llama_toy_shaped(seed: int = 0):
    """A Llama of the toy student's shape (the hand-written decoder's path on CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize(("temperature", "top_p", "check_every"), [(1.0, 1.0, 1), (1.0, 0.9, 3), (0.0, 1.0, 2)])
def test_samples_equal_a_row_by_row_reference_as_finished_rows_leave(
    arch, temperature, top_p, check_every, monkeypatch
):
    """Rows of different lengths (many stop ids) leave the batch every `check_every` tokens; every row's tokens
    and log-probs are still those of a sampler that runs it alone, uncached, to its end."""
    model = _qwen3(seed=6) if arch == "qwen3" else _llama_toy_shaped(seed=6)
    prompts, n = _prompts(12, seed=6), 20
    uniforms = _uniforms(12, n, seed=8)
    options = dict(max_new_tokens=n, stop_ids=tuple(range(1, 40)), vocab_limit=LIMIT, banned_ids=(41,),
                   temperature=temperature, top_p=top_p)  # fmt: skip
    decoder = type(decoder_for(model))
    assert decoder is (LibraryDecoder if arch == "qwen3" else LlamaDecoder)
    kept: list[int] = []
    keep = decoder.keep
    monkeypatch.setattr(decoder, "keep", lambda self, rows: kept.append(len(rows)) or keep(self, rows))
    roll = sample(model, prompts, pad_id=PAD, uniforms_B_T=uniforms, check_every=check_every, **options)
    lengths = roll.lengths_B.tolist()
    assert len(set(lengths)) > 2 and kept, "rows of different lengths, some of which left the batch"
    for (tokens, logprobs), row, got_lp, n_b in zip(
        _reference(model, prompts, uniforms_B_T=uniforms, **options), roll.response_ids_B_T, roll.logprobs_B_T,
        lengths, strict=True,
    ):  # fmt: skip
        assert row[:n_b].tolist() == tokens and bool(row[n_b:].eq(PAD).all())
        torch.testing.assert_close(got_lp[:n_b], torch.tensor(logprobs), atol=1e-4, rtol=1e-4)


def test_prefill_sends_only_the_last_position_through_a_real_vocabulary_head():
    """Qwen3's 151,936-row head: B x P x V float32 logits of 16 prompts of 300 tokens would be 2.9 GB."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=151936,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    positions: list[int] = []
    model.lm_head.register_forward_hook(lambda _m, args, _out: positions.append(args[0].shape[1]))
    prompts = [list(range(1, 300 - i)) for i in range(16)]
    roll = sample(model, prompts, max_new_tokens=3, pad_id=PAD, generator=torch.Generator().manual_seed(0))
    assert positions == [1, 1, 1] and roll.response_ids_B_T.shape == (16, 3)


def test_batches_are_bounded_in_tokens_and_change_no_sample():
    assert batch_rows([[1] * 5] * 4, 3, 0) == [slice(0, 4)]
    assert batch_rows([[1] * 5] * 4, 3, 16) == [slice(0, 2), slice(2, 4)]  # 2 rows x (5 + 3) = 16
    assert batch_rows([[1] * 2, [1] * 9, [1] * 2], 3, 12) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # 12 < 2 x 12
    assert batch_rows([[1] * 30], 3, 8) == [slice(0, 1)]  # a row alone over the bound is a batch of its own
    model, prompts = _qwen3(seed=7), _prompts(9, seed=7)
    options = dict(max_new_tokens=10, pad_id=PAD, vocab_limit=LIMIT, stop_ids=(1, 2, 3))
    whole = sample_in_batches(model, prompts, batch_tokens=0, generator=torch.Generator().manual_seed(1), **options)
    for bound in (1, 25, 60):
        part = sample_in_batches(model, prompts, batch_tokens=bound, generator=torch.Generator().manual_seed(1),
                                 **options)  # fmt: skip
        assert part == whole
    greedy = sample_in_batches(model, prompts, batch_tokens=30, temperature=0.0, **options)
    assert greedy == sample(model, prompts, temperature=0.0, **options).responses()


def test_sampling_under_bfloat16_autocast_runs_the_forward_in_bfloat16():
    """`autocast_dtype` runs the sampling forward as the training forward runs (float32 weights, bfloat16 matmuls),
    so that the policy that samples is the one that trains; the log-probs stay float32."""
    model, prompts = _qwen3(seed=8), _prompts(6, seed=8)
    head_dtypes: list[torch.dtype] = []
    model.lm_head.register_forward_hook(lambda _m, _args, out: head_dtypes.append(out.dtype))
    options = dict(max_new_tokens=8, pad_id=PAD, vocab_limit=LIMIT, generator=torch.Generator().manual_seed(0))
    roll = sample(model, prompts, autocast_dtype=torch.bfloat16, **options)
    assert set(head_dtypes) == {torch.bfloat16} and next(model.parameters()).dtype == torch.float32
    assert roll.logprobs_B_T.dtype == torch.float32 and bool(torch.isfinite(roll.logprobs_B_T).all())
    head_dtypes.clear()
    sample(model, prompts, **options)
    assert set(head_dtypes) == {torch.float32}


@pytest.mark.slow  # compiles the decode step (torch.compile, inductor on CPU): about 7 s a world on 2 cores
@pytest.mark.parametrize("world", ["toy_quick", "realworld"])
def test_compiled_static_cache_decoding_gives_the_library_decoders_tokens(world, request):
    """`rollout.compile`: the static cache and the compiled step give the same tokens as the library's own cache,
    greedy and sampled, while finished rows leave the batch at power-of-two sizes (filled with finished rows); run
    twice, the second reuses the compiled graphs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(world) / "student", dtype=torch.float32)
    model.eval()
    V = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, min(60, V), (int(k),), generator=g).tolist()
               for k in torch.randint(3, 12, (8,), generator=g)]  # fmt: skip
    for temperature in (0.0, 1.0):
        options = dict(max_new_tokens=40, pad_id=0, stop_ids=range(1, V, 9), temperature=temperature,
                       uniforms_B_T=_uniforms(8, 40), decoder="library")  # fmt: skip
        library = sample(model, prompts, **options)
        for _ in range(2):
            compiled = sample(model, prompts, compiled=True, **options)
            assert compiled.responses() == library.responses()
            torch.testing.assert_close(compiled.logprobs_B_T, library.logprobs_B_T, atol=1e-4, rtol=1e-4)
        if temperature:  # rows stopped at different lengths: some left the batch
            assert len(set(library.lengths_B.tolist())) > 2


def test_rollout_compile_auto_is_off_on_cpu_and_true_is_refused_where_it_cannot_run():
    from trainer.rollout.decode import StaticDecoder, decoder_for, resolve_compile
    from tropd.errors import UserError

    model = _qwen3()
    assert resolve_compile("auto", model) is False  # on CPU the compilation costs more than it saves
    assert resolve_compile(True, model) is True and resolve_compile(False, model) is False
    assert isinstance(decoder_for(model, compiled=True), StaticDecoder)

    class NoStaticCache(torch.nn.Module):
        config = model.config

    with pytest.raises(UserError, match=r"rollout.compile=true but transformers cannot compile 'qwen3'"):
        resolve_compile(True, NoStaticCache())

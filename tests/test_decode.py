"""The plain-torch Llama decoder against the library's own forward: same logits, same samples; and the measured
rule that picks between them."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from trainer.rollout import sampling
from trainer.rollout.decode import FAST_DECODER_MAX_WIDTH_X_DEPTH, LibraryDecoder, LlamaDecoder, decoder_for
from tropd.errors import UserError


def _llama(kv_heads: int, bias: bool, tied: bool, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=23, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, attention_bias=bias, mlp_bias=bias, tie_word_embeddings=tied,
        max_position_embeddings=128, pad_token_id=0, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random biases: the library initialises them to zero, which would hide a missing bias
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (n,), generator=g)
    return [torch.randint(3, 23, (int(k),), generator=g).tolist() for k in lengths]


@pytest.mark.parametrize(("kv_heads", "bias", "tied"), [(4, False, True), (2, True, False), (1, False, False)])
def test_decoder_logits_match_the_library_forward(kv_heads, bias, tied):
    model = _llama(kv_heads, bias, tied)
    prompts = _prompts(6)
    ids, mask = sampling.left_pad(prompts, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = torch.randint(3, 23, (6, 5), generator=torch.Generator().manual_seed(1))
    decoder = LlamaDecoder(model)
    with torch.no_grad():
        got = [decoder.prefill(ids, mask, positions, extra.shape[1])]
        for t in range(extra.shape[1]):
            got.append(decoder.step(extra[:, t], positions[:, -1] + 1 + t))
        # the library, on the whole sequence at once, left padding masked
        full_ids = torch.cat([ids, extra], 1)
        full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
        full_pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
        want = model(input_ids=full_ids, attention_mask=full_mask, position_ids=full_pos).logits
    P = ids.shape[1]
    for t, logits in enumerate(got):
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits, want[:, P - 1 + t], atol=2e-5, rtol=1e-5)


def test_sampling_is_the_same_with_and_without_the_fast_decoder():
    model = _llama(2, True, True, seed=3)
    prompts = _prompts(16, seed=2)
    uniforms = torch.rand((16, 12), generator=torch.Generator().manual_seed(5))
    options = dict(max_new_tokens=12, eos_id=2, pad_id=0, banned_ids=(0, 1), uniforms_B_T=uniforms)
    fast = sampling.sample(model, prompts, **options, decoder="fast")
    greedy_fast = sampling.sample(model, prompts, **options, temperature=0.0, decoder="fast")
    slow = sampling.sample(model, prompts, **options, decoder="library")
    greedy_slow = sampling.sample(model, prompts, **options, temperature=0.0, decoder="library")
    assert torch.equal(fast.response_ids_B_T, slow.response_ids_B_T)
    assert torch.equal(fast.lengths_B, slow.lengths_B)
    torch.testing.assert_close(fast.logprobs_B_T, slow.logprobs_B_T, atol=2e-5, rtol=1e-5)
    assert torch.equal(greedy_fast.response_ids_B_T, greedy_slow.response_ids_B_T)


def test_other_architectures_use_the_library_forward():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=23, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert isinstance(decoder_for(gpt2), LibraryDecoder)
    assert isinstance(decoder_for(gpt2, "library"), LibraryDecoder)
    with pytest.raises(UserError, match="plain Llama"):
        decoder_for(gpt2, "fast")
    with pytest.raises(UserError, match="auto, fast, library"):
        decoder_for(gpt2, "fastest")
    sampled = sampling.sample(gpt2.eval(), _prompts(3), max_new_tokens=4, eos_id=2, pad_id=0, banned_ids=(0,))
    assert sampled.response_ids_B_T.shape[0] == 3


def _sized_llama(hidden: int, layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=23, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_the_size_rule_picks_the_fast_decoder_only_for_small_llamas_on_cpu():
    at_bound = _sized_llama(FAST_DECODER_MAX_WIDTH_X_DEPTH // 4, 4)
    over = _sized_llama(FAST_DECODER_MAX_WIDTH_X_DEPTH // 4, 5)
    toy_student = _sized_llama(96, 3)
    assert isinstance(decoder_for(toy_student), LlamaDecoder)
    assert isinstance(decoder_for(at_bound), LlamaDecoder)
    assert isinstance(decoder_for(over), LibraryDecoder)
    assert isinstance(decoder_for(over, "fast"), LlamaDecoder)  # forced: still supported
    assert isinstance(decoder_for(toy_student, "library"), LibraryDecoder)
    no_rope = _sized_llama(96, 3)
    no_rope.model.rotary_emb.rope_type = "yarn"  # an option the fast decoder does not implement
    assert isinstance(decoder_for(no_rope), LibraryDecoder)


def test_the_fast_decoder_keeps_a_bfloat16_model_in_bfloat16():
    model = _llama(2, False, True)
    prompts = _prompts(4)
    ids, mask = sampling.left_pad(prompts, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = LlamaDecoder(model).prefill(ids, mask, positions, 2)
        decoder = LlamaDecoder(model.to(torch.bfloat16))
        got = decoder.prefill(ids, mask, positions, 2)
    assert got.dtype == torch.bfloat16 and all(k.dtype == torch.bfloat16 for k in decoder.keys)
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)
    sampled = sampling.sample(model, prompts, max_new_tokens=5, pad_id=0, eos_id=2, decoder="fast")
    assert sampled.logprobs_B_T.dtype == torch.float32 and bool(torch.isfinite(sampled.logprobs_B_T).all())

import pytest

from services.teacher.protocol import chat_template_fingerprint, tokenizer_fingerprint
from trainer.toy import tasks
from trainer.toy.tokenizer import VOCAB, build_hf_tokenizer


def test_hf_tokenizer_round_trip_matches_vocab(tmp_path):
    build_hf_tokenizer().save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (VOCAB.pad_id, VOCAB.bos_id, VOCAB.eos_id)
    assert tok.convert_tokens_to_ids("<sep>") == VOCAB.sep_id
    for task in tasks.TASKS:
        for e in tasks.examples(task, "train", 100):
            text = e.prompt + e.teacher
            ids = tok.encode(text, add_special_tokens=False)
            assert ids == VOCAB.encode(text)
            assert tok.decode(ids) == text
    full = VOCAB.prompt_ids("1+2+3") + VOCAB.encode("#6") + [VOCAB.eos_id]
    assert tok.decode(full, skip_special_tokens=True) == "1+2+3#6"


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    build_hf_tokenizer().save_pretrained(a)
    build_hf_tokenizer().save_pretrained(b)
    tok = build_hf_tokenizer()
    tok.add_tokens(["X"])
    tok.save_pretrained(c)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    assert len(tokenizer_fingerprint(a)) == 64
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(c)
    assert chat_template_fingerprint(a) is None


def test_unknown_character_is_a_clear_error():
    with pytest.raises(ValueError, match="not in the toy vocabulary"):
        VOCAB.encode("1+x")

"""A character-level tokenizer for the toy world, saved as a Hugging Face tokenizer directory.

Every sequence reads `<bos> prompt <sep> response <eos>`; `<pad>` fills batches. Training code maps
characters to ids through `Vocab` (a plain dict, fast); `build_hf_tokenizer` wraps the same table in a
`PreTrainedTokenizerFast` so that transformers and vLLM load it with `AutoTokenizer`.
"""

from __future__ import annotations

from dataclasses import dataclass

PAD, BOS, EOS, SEP = "<pad>", "<bos>", "<eos>", "<sep>"
SPECIALS = (PAD, BOS, EOS, SEP)
CHARS = "0123456789+-*=()[];#| "


@dataclass(frozen=True)
class Vocab:
    """Character <-> id table; ids 0-3 are pad, bos, eos, sep."""

    tokens: tuple[str, ...] = SPECIALS + tuple(CHARS)

    @property
    def size(self) -> int:
        return len(self.tokens)

    def id(self, token: str) -> int:
        return self.tokens.index(token)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def sep_id(self) -> int:
        return 3

    def encode(self, text: str) -> list[int]:
        table = self._table()
        try:
            return [table[c] for c in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the toy vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        """Characters of `ids`; special tokens are dropped."""
        return "".join(self.tokens[i] for i in ids if i >= len(SPECIALS))

    def prompt_ids(self, prompt: str) -> list[int]:
        return [self.bos_id, *self.encode(prompt), self.sep_id]

    def _table(self) -> dict[str, int]:
        table = _TABLES.get(self.tokens)
        if table is None:
            table = _TABLES[self.tokens] = {t: i for i, t in enumerate(self.tokens)}
        return table


_TABLES: dict[tuple[str, ...], dict[str, int]] = {}
VOCAB = Vocab()


def build_hf_tokenizer(vocab: Vocab = VOCAB):
    """A `PreTrainedTokenizerFast` whose ids equal `vocab`'s, one token per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {t: i for i, t in enumerate(vocab.tokens)}
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        sep_token=SEP,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )

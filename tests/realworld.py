"""A small model world shaped like a real one, built at test time (nothing of it is committed).

The toy world has a character-level tokenizer and one eos id; real teachers do not. This one has what users
bring from the Qwen3 family: a byte-level BPE tokenizer with ChatML special tokens at the end of the vocabulary
and a ChatML chat template in `tokenizer_config.json`, no bos token, models whose embedding has more rows than
the tokenizer has tokens, and a `generation_config.json` whose `eos_token_id` is a list (`<|im_end|>` ends a chat
turn, `<|endoftext|>` a plain-text document). The teacher is trained briefly so that its drafts end with either
id; the student, smaller and trained less on other text, disagrees with it.

`build_realworld(out)` makes, under `out`: `teacher/`, `student/` (safetensors + tokenizer files), prompt sets
`train-chat.jsonl`, `train-text.jsonl`, `eval-chat.jsonl`, `eval-text.jsonl`, and `build.json` (the stamp).
"""

from __future__ import annotations

import fcntl
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

VERSION = 1
SEED = 0
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # in Qwen's order: ids n, n+1, n+2
BPE_VOCAB = 900  # at most: bytes (256) plus merges (this corpus stops at about 610); the specials come after
MAX_LEN = 512
SYSTEM = "You are a helpful assistant."
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Spec:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    steps: int
    lr: float
    mix: str  # "all": chat and text; "text": plain text only (the student never sees a chat turn)


# vLLM's CPU attention needs a head size of at least 32, so the teacher's heads are wider than hidden / heads
TEACHER = Spec(hidden=64, layers=3, heads=4, kv_heads=2, intermediate=192, steps=240, lr=3e-3, mix="all")
STUDENT = Spec(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=96, steps=60, lr=2e-3, mix="text")
HEAD_DIM = 32
BATCH = 32


# ---- text ----------------------------------------------------------------------------------------------

NOUNS = (
    "cat dog bird river garden teacher student city forest window book song train market child farmer doctor "
    "mountain village kitchen letter painter sailor island bicycle lantern orchard library musician harbour"
).split()
ADJECTIVES = "small quiet bright old green happy busy cold warm tall gentle curious patient silver yellow".split()
VERBS = "sees likes finds follows paints visits watches remembers carries builds answers describes admires".split()
PLACES = (
    "near the bridge|in the morning|after the rain|by the sea|under the tree|at the station|before dinner|"
    "during the winter|behind the school|across the valley"
).split("|")


def sentence(rng: random.Random, noun: str | None = None) -> str:
    noun = noun or rng.choice(NOUNS)
    words = f"The {rng.choice(ADJECTIVES)} {noun} {rng.choice(VERBS)} the {rng.choice(NOUNS)}"
    return f"{words} {rng.choice(PLACES)}." if rng.random() < 0.6 else f"{words}."


def arithmetic(rng: random.Random) -> tuple[str, str]:
    """(question, answer): a sum or difference of two numbers below 10, answer as digits."""
    a, b = rng.randrange(10), rng.randrange(10)
    op = rng.choice("+-")
    value = a + b if op == "+" else a - b
    ask = rng.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?"])
    return ask.format(a=a, op=op, b=b), str(value)


def request(rng: random.Random) -> tuple[str, str]:
    """(user message, answer): arithmetic two times in three, else a sentence about a given noun."""
    if rng.random() < 2 / 3:
        return arithmetic(rng)
    noun = rng.choice(NOUNS)
    return f"Write a sentence about a {noun}.", sentence(rng, noun)


def chat_record(rng: random.Random) -> dict:
    question, answer = request(rng)
    system = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    return {"messages": [*system, {"role": "user", "content": question}], "answer": answer}


def text_record(rng: random.Random) -> dict:
    question, answer = request(rng)
    return {"prompt": f"Question: {question}\nAnswer:", "answer": answer}


def render_chat(record: dict) -> str:
    """The conversation as the chat template renders it, with the assistant's answer and `<|im_end|>`."""
    turns = [*record["messages"], {"role": "assistant", "content": record["answer"]}]
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns)


def render_text(record: dict) -> str:
    return f"{record['prompt']} {record['answer']}<|endoftext|>"


def document(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(2, 4))) + "<|endoftext|>"


def corpus(rng: random.Random, n: int) -> list[str]:
    """`n` texts for the tokenizer: documents, chat turns and Q&A, as the models will see them."""
    makers = [document, lambda r: render_chat(chat_record(r)), lambda r: render_text(text_record(r))]
    return [makers[i % 3](rng) for i in range(n)]


# ---- tokenizer and models --------------------------------------------------------------------------------


def build_tokenizer(texts: list[str]):
    """A byte-level BPE (as GPT-2, Llama 3 and Qwen use) trained on `texts`, the specials added after it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    # the specials are cut out of the training text: they are added tokens, never merged
    plain = [t.replace("<|im_start|>", " ").replace("<|im_end|>", " ").replace("<|endoftext|>", " ") for t in texts]
    tok.train_from_iterator(plain, trainer)
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_LEN,
        clean_up_tokenization_spaces=False,
    )


def model_vocab_size(tokenizer_len: int) -> int:
    """Embedding rows as Qwen pads them: the tokenizer's length rounded up to a multiple of 128, plus 64."""
    return -(-tokenizer_len // 128) * 128 + 64


def new_model(spec: Spec, vocab_size: int, ids: dict[str, int], seed: int):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_LEN,
        tie_word_embeddings=True,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],  # as Qwen3's instruct models: the generation config adds <|endoftext|>
        dtype="float32",
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)


def generation_config(ids: dict[str, int]):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )


def train(model, spec: Spec, tokenizer, seed: int) -> float:
    """Plain next-token SFT (every token but padding carries loss) on texts of `spec.mix`; the last loss."""
    import torch

    rng = random.Random(f"train/{seed}/{spec}")
    makers = [document, lambda r: render_text(text_record(r))]
    if spec.mix == "all":
        makers.append(lambda r: render_chat(chat_record(r)))
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = spec.lr * min(1.0, (step + 1) / 20)
        texts = [rng.choice(makers)(rng) for _ in range(BATCH)]
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        labels_B_T = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels_B_T).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return loss.item()


def save(model, tokenizer, ids: dict[str, int], path: Path) -> None:
    model.generation_config = generation_config(ids)
    model.save_pretrained(path, safe_serialization=True)
    # save_jinja_files=False keeps the template in tokenizer_config.json, where Qwen ships it
    tokenizer.save_pretrained(path, save_jinja_files=False)


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def settings() -> dict:
    return {"version": VERSION, "seed": SEED, "teacher": asdict(TEACHER), "student": asdict(STUDENT)}


def is_built(out: Path) -> bool:
    try:
        return json.loads((out / "build.json").read_text())["settings"] == settings()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def build_realworld(out: Path) -> Path:
    """Make the world under `out` (about 30 s on 2 cores) or return at once when it is built. Concurrent test
    runs wait on a lock file beside `out`, and one of them builds."""
    out = Path(out)
    if is_built(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_built(out):
            _build(out)
    return out


def _build(out: Path) -> None:
    import torch

    if out.is_dir() and any(out.iterdir()) and not (out / "build.json").is_file():
        raise RuntimeError(f"{out} holds files this build did not make: choose a new or empty directory")
    start = time.monotonic()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    rng = random.Random(SEED)
    for split, n in (("train", 200), ("eval", 40)):
        write_jsonl(tmp / f"{split}-chat.jsonl", [chat_record(rng) for _ in range(n)])
        write_jsonl(tmp / f"{split}-text.jsonl", [text_record(rng) for _ in range(n)])
    tokenizer = build_tokenizer(corpus(random.Random(f"corpus/{SEED}"), 3000))
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIALS}
    vocab_size = model_vocab_size(len(tokenizer))
    threads = torch.get_num_threads()
    # one thread: on a loaded 2-core machine two threads of so small a model run many times slower
    torch.set_num_threads(1)
    losses = {}
    try:
        for role, spec, seed in (("teacher", TEACHER, SEED), ("student", STUDENT, SEED + 1)):
            model = new_model(spec, vocab_size, ids, seed)
            losses[role] = train(model, spec, tokenizer, seed)
            save(model, tokenizer, ids, tmp / role)
    finally:
        torch.set_num_threads(threads)
    record = {"settings": settings(), "tokenizer_len": len(tokenizer), "vocab_size": vocab_size, "ids": ids,
              "final_loss": losses, "seconds": round(time.monotonic() - start, 1)}  # fmt: skip
    (tmp / "build.json").write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# ---- real shapes: Qwen3's output head and prompts of hundreds of tokens ------------------------------------
QWEN3_ROWS = 151936


def long_record(rng: random.Random, tokenizer, prompt_tokens: int) -> dict:
    """A text prompt of at least `prompt_tokens` tokens: documents to read, then a question."""
    question, answer = request(rng)
    context = ""
    while len(tokenizer(context)["input_ids"]) < prompt_tokens:
        context += " ".join(sentence(rng) for _ in range(4)) + "\n"
    return {"prompt": f"{context}Question: {question}\nAnswer:", "answer": answer}


def build_real_shaped(realworld: Path, out: Path, rows: int = QWEN3_ROWS, prompt_tokens: int = 380,
                      n_train: int = 64, n_eval: int = 256) -> Path:  # fmt: skip
    """Under `out`: `student/`, the real world's student with `rows` embedding rows (Qwen3's 151,936 by default:
    tied, so the output head has as many) and the same tokenizer; `train-long.jsonl` and `eval-long.jsonl`, text
    prompts of at least `prompt_tokens` tokens. The real world's teacher (fewer rows) scores it. Made once per `out`
    and settings (a few seconds)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    stamp = {"rows": rows, "prompt_tokens": prompt_tokens, "n_train": n_train, "n_eval": n_eval, "version": 1}
    try:
        if json.loads((out / "build.json").read_text()) == stamp:
            return out
    except (OSError, ValueError):
        pass
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(realworld / "student")
    model = AutoModelForCausalLM.from_pretrained(realworld / "student", dtype="float32")
    model.resize_token_embeddings(rows, mean_resizing=False)
    model.save_pretrained(out / "student", safe_serialization=True)
    tokenizer.save_pretrained(out / "student", save_jinja_files=False)
    shutil.copy(realworld / "student" / "generation_config.json", out / "student" / "generation_config.json")
    rng = random.Random(f"long/{SEED}")
    for split, n in (("train", n_train), ("eval", n_eval)):
        write_jsonl(out / f"{split}-long.jsonl", [long_record(rng, tokenizer, prompt_tokens) for _ in range(n)])
    (out / "build.json").write_text(json.dumps(stamp))
    return out

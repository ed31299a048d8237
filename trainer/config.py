"""Typed, validated training configuration: a YAML file plus `key=value` overrides.

    tropd train --config configs/toy-tropd.yaml steps=100 loss.outlier=mask teacher.url=http://t:8000

An unknown key or a bad value is a `UserError` naming the key, raised before any work starts.
The resolved config is written to the run directory as `config.yaml`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tropd.errors import UserError

TOPD_ALPHA = 0.2  # TOP-D's reported weight of the teacher in its proximal teacher (0.1 or 0.2)


class _Section(BaseModel):
    # inf is refused like nan (an infinite lr or clip is never meant); `out=123` stays the string "123"
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, coerce_numbers_to_str=True)


class TeacherConfig(_Section):
    url: str | list[str] = Field(
        "http://127.0.0.1:8000",
        description="base URL of the teacher service, or a list of replicas' URLs (each request goes to the "
        "replica with the fewest tokens outstanding; one that fails is taken out and probed back)",
    )
    api: Literal["tropd", "vllm-openai", "inprocess"] = Field(
        "tropd", description="our service, a stock vLLM OpenAI server, or `model` loaded in the trainer's process"
    )
    model: str | None = Field(None, description="inprocess: the teacher model directory")
    engine: Literal["hf", "vllm"] = Field("hf", description="inprocess: the engine that loads `model`")
    api_key_env: str | None = Field(None, description="environment variable holding the bearer key")
    api_key_file: str | None = Field(
        None, description="file holding the bearer key (a mounted Secret), read again on a 401 (a rotated key)"
    )
    top_k: int = Field(8, ge=0, le=1024, description="teacher top-k for forward-KL terms")
    temperature: float = Field(
        1.0,
        ge=0.01,
        le=100,
        description="the teacher's scores are log-softmax(logits / temperature) (above 1 softens the teacher the "
        "student learns from, in training and in eval's reverse KL); a teacher that cannot honour it (a stock vLLM "
        "server, an engine without a logits scale) is refused at start",
    )
    timeout_s: float = Field(120.0, gt=0, description="seconds one request may take before it is retried")
    retries: int = Field(
        12, ge=0, description="retries with back-off on connection errors, timeouts, 429, 502, 503 and 504"
    )
    max_concurrency: int = Field(4, ge=1, description="scoring requests in flight at once")
    request_sequences: int = Field(64, ge=1, description="sequences per scoring request")
    client_id: str | None = Field(None, description="sent as X-TrOPD-Client (default: hostname-pid)")
    resolve_replicas: bool = Field(
        False,
        description="at start, expand each URL's host name into one replica per address it resolves to (a "
        "Kubernetes headless Service lists every ready teacher pod); replicas started later are not seen",
    )
    skip_tokenizer_check: bool = Field(
        False,
        description="vllm-openai: accept a stock server that cannot tokenize (--skip-tokenizer-init), whose "
        "tokenizer the start-up probe cannot compare with the student's",
    )

    @model_validator(mode="after")
    def _one_key(self):
        if self.api_key_env and self.api_key_file:
            raise ValueError("api_key_env and api_key_file are both set: give one of them")
        if isinstance(self.url, list):
            if not self.url:
                raise ValueError("url is an empty list: give one URL or a list of the replicas' URLs")
            if len(set(self.url)) != len(self.url):
                raise ValueError(f"url lists a replica twice: {self.url}")
            if len(self.url) > 1 and self.api != "tropd":
                raise ValueError(f"url: a list of replicas needs api=tropd (the service), not api={self.api}")
        return self


class LossConfig(_Section):
    method: str = Field(
        "tropd",
        description="the loss: tropd or a baseline: opd, eopd, reopold, topd, gkd, sft (the table in "
        "trainer/methods.py; formulas in trainer/losses.py)",
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        from trainer.methods import METHODS  # the table imports the losses (torch): only when a config is checked

        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
        return name

    rule: Literal["threshold", "stochastic", "adaptive"] = Field("stochastic", description="trust rule")
    tau: float = Field(0.1, ge=0, le=1, description="threshold on P_t = min(1, p_T/p_S)")
    quantile: float = Field(0.5, ge=0, le=1, description="adaptive rule: per-batch quantile of P_t")
    outlier: Literal["mask", "clip", "topk_fkl"] = Field(
        "topk_fkl", description="treatment of tokens outside the trust region"
    )
    clip_c: float = Field(2.0, gt=0, description="clip rule: advantages clipped to >= -clip_c")
    lambda_out: float = Field(1.0, ge=0, description="weight of the outlier term")
    lambda_prefix: float = Field(1.0, ge=0, description="weight of forward KD on teacher-prefix tokens")
    discount: float = Field(0.0, ge=0, le=1, description="OPD advantage: discounted sum of future d_t")
    ratio_eps: float = Field(0.2, gt=0, le=1, description="importance-ratio clip for stale rollouts")
    entropy_threshold: float = Field(1.0, ge=0, description="eopd: teacher entropy above which FKL is added")
    lambda_fkl: float = Field(1.0, ge=0, description="eopd: weight of the forward-KL term")
    floor_lambda: float = Field(
        0.2, gt=0, lt=1, description="reopold: reward floor log(floor_lambda / (1 - floor_lambda)) (0.2: log 0.25)"
    )
    token_share: float = Field(0.5, gt=0, le=1, description="reopold: share of highest-entropy tokens trained")
    refine_after: int | None = Field(
        None, ge=0, description="reopold: last step of the explore stage; plain OPD after it (None: half of steps)"
    )
    alpha: float = Field(
        TOPD_ALPHA, gt=0, le=1, description="topd: weight a of the proximal teacher a p_T + (1 - a) p_S"
    )
    beta: float = Field(0.5, ge=0, le=1, description="gkd: generalized JSD weight")
    on_policy_share: float = Field(0.5, ge=0, le=1, description="gkd: share of student-generated batches")


class GuidanceConfig(_Section):
    enabled: bool = Field(True, description="off-policy guidance by teacher-written prefixes (tropd only)")
    schedule: Literal["share", "length"] = Field(
        "share",
        description="share: the share of prompts with a prefix decays linearly to zero (prefix length drawn in "
        "1..prefix_tokens); length: every prompt_share of prompts gets a prefix whose length, prefix_tokens at step 0, "
        "is annealed to zero on a cosine",
    )
    prefix_loss: Literal["topk_fkl", "sampled_fkl"] = Field(
        "topk_fkl", description="loss on prefix tokens: top-k forward KL, or the sampled-token estimate t - s"
    )
    prompt_share: float = Field(0.5, ge=0, le=1, description="share of prompts with a teacher prefix at step 0")
    prefix_tokens: int = Field(8, ge=1, description="most teacher-draft tokens used as a prefix")
    decay_steps: int = Field(300, ge=1, description="steps over which the share (or the length) decays to zero")


class RolloutConfig(_Section):
    prompts_per_step: int = Field(64, ge=1, description="prompts sampled per optimizer step (global batch)")
    samples_per_prompt: int = Field(1, ge=1, description="student samples drawn for each prompt")
    max_new_tokens: int = Field(40, ge=1, description="longest student response, in tokens")
    temperature: float = Field(1.0, gt=0, description="student sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="student nucleus-sampling threshold (1: off)")
    micro_batch_sequences: int = Field(
        0, ge=0, description="sequences per forward/backward (0: the whole batch); gradients accumulate, same result"
    )
    sample_batch_tokens: int = Field(
        65536,
        ge=0,
        description="KV-cache tokens sampled at once, rows x (longest prompt + max_new_tokens), in rollouts and eval "
        "alike (0: the whole batch at once); the same samples whatever it is",
    )
    engine: Literal["auto", "torch", "vllm"] = Field(
        "auto",
        description="what samples the student: torch (the trainer's own decoding loop) or vllm (a vLLM engine in the "
        "trainer's process, its weights synced from the trainer's); auto: vllm on CUDA when it is installed, else "
        "torch",
    )
    sync_every: int = Field(
        1,
        ge=1,
        description="vllm: copy the trainer's weights into the engine every N steps (rows sampled by older "
        "weights are corrected like max_staleness rows, with the engine's log-probs as the old policy's)",
    )
    vllm_memory_share: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="vllm on CUDA: the share of the device's memory the engine takes (it sleeps while "
        "the trainer steps)",
    )
    is_clip: float = Field(
        2.0,
        ge=0,
        description="vllm: truncated importance sampling of fresh rows, each token's policy-gradient "
        "loss times min(p_trainer / p_sampler, is_clip), detached (0: off; never with the torch engine)",
    )
    mismatch_warn: float = Field(
        0.05,
        gt=0,
        description="vllm: warn when the engine's log-probs of its samples exceed the trainer's by more "
        "than this (rollout_mismatch_k1, nats/token)",
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="decode over a static KV cache with the one-token step compiled by torch.compile (CUDA graphs on "
        "CUDA); the same samples. auto: on CUDA where transformers can compile the student's architecture",
    )


class OptimConfig(_Section):
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate after warmup")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(50, ge=0, description="steps of linear warmup from lr/warmup_steps")
    schedule: Literal["constant", "cosine"] = Field("cosine", description="lr after warmup: cosine to 0, or constant")
    grad_clip: float = Field(1.0, gt=0, description="gradient norm clip")


class EvalConfig(_Section):
    every: int = Field(250, ge=0, description="evaluate every N steps (0: only before and after)")
    n: int = Field(200, ge=1, description="greedy-accuracy prompts per eval set (toy: per task)")
    kl_prompts: int = Field(64, ge=1, description="held-out prompts for the reverse-KL estimate")
    tasks: list[Literal["math", "code", "general"]] = Field(
        default_factory=lambda: ["math", "code", "general"],
        min_length=1,
        description="toy source: the tasks evaluated (accuracy and reverse KL), one eval set each",
    )
    verifier: str = Field(
        "auto",
        description="accuracy on held-out prompts: auto (toy: the task verifiers; files: exact when records have an "
        "answer, else none), none (reverse KL only), exact, math (math-verify), toy, or module:function",
    )
    max_new_tokens: int | None = Field(None, ge=1, description="longest eval response (default: rollout's)")
    before_after: bool = Field(True, description="evaluate before and after training")


class DataFile(_Section):
    path: str = Field(min_length=1, description="a prompt file or save_to_disk folder")
    teacher: str | None = Field(None, description="the name (in `teachers`) of the teacher of its prompts")


def file_path(entry: str | DataFile) -> str:
    return entry if isinstance(entry, str) else entry.path


def file_teacher(entry: str | DataFile) -> str | None:
    return None if isinstance(entry, str) else entry.teacher


class DataConfig(_Section):
    source: Literal["toy", "files"] = Field("toy", description="where prompts come from: the toy world or your files")
    toy: dict[Literal["math", "code", "general"], float] = Field(
        default_factory=lambda: {"math": 0.45, "code": 0.25, "general": 0.3}, description="toy source: task mix"
    )
    train: list[str | DataFile] = Field(
        default_factory=list,
        description="files source: JSONL / JSON / Parquet files, or folders written by datasets' save_to_disk; an "
        "entry {path, teacher} names the teacher (of `teachers`) that scores its prompts (default: the first)",
    )
    eval: list[str | DataFile] = Field(
        default_factory=list,
        description="files source: held-out prompt files (default: a share of train), each a path or {path, teacher}",
    )
    toy_teachers: dict[Literal["math", "code", "general"], str] = Field(
        default_factory=dict,
        description="toy source with `teachers`: the teacher that scores each task's prompts (default: the first)",
    )
    eval_share: float = Field(
        0.05, ge=0, lt=1, description="files source without `eval`: share of train records held out for eval"
    )
    prompt_field: str = Field(
        "auto", min_length=1, description="auto: `messages` (a chat) if records have it, else `prompt` (plain text)"
    )
    answer_field: str = Field("answer", min_length=1, description="reference answer for the verifier (optional)")
    chat_template: str = Field(
        "auto",
        min_length=1,
        description="auto: the student tokenizer's chat template renders `messages`; or a .jinja file to use instead",
    )
    max_prompt_tokens: int = Field(1024, ge=1, description="longer prompts are skipped and counted, never truncated")


class DistConfig(_Section):
    timeout_s: float = Field(
        1800,
        gt=0,
        description="how long a rank waits in a collective (NCCL/gloo) before the run fails: longer than "
        "the longest eval or checkpoint one rank makes while the others wait",
    )


class TrainConfig(_Section):
    student: str = Field("artifacts/toy/student", description="student model directory (Hugging Face layout)")
    out: str = Field("runs/tropd", description="run directory")
    steps: int = Field(1000, ge=1, description="optimizer steps")
    seed: int = Field(0, ge=0, description="seeds sampling, data order and the trust rule's draws")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda when available (torchrun: cuda:LOCAL_RANK)"
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="auto: bfloat16 on a CUDA device that supports it, float32 on CPU; bfloat16: autocast for "
        "sampling and training alike, float32 master weights and optimizer state",
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: DDP, or FSDP2 (fully_shard) for big students"
    )
    gradient_checkpointing: bool = Field(False, description="recompute the student's activations in backward")
    loss_chunk_tokens: int | None = Field(
        None,
        ge=0,
        description="positions whose float32 logits are held at once (None: all when a batch's fit 256 MiB, else as "
        "many as fit; 0: all, through the model's own forward)",
    )
    max_staleness: int = Field(0, ge=0, le=8, description="0: strictly on-policy; k: rollouts up to k steps old")
    checkpoint_every: int = Field(250, ge=0, description="0: only at the end")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept in the run directory")
    export_every: int = Field(
        0,
        ge=0,
        description="every N steps, also write the student as a whole Hugging Face folder, exports/step-NNNNNN (0: "
        "only the final student/)",
    )
    tensorboard: bool = Field(True, description="write TensorBoard logs beside metrics.jsonl")
    plot: bool = Field(True, description="write curves.png at the end")
    memory_limit_gb: float | None = Field(
        None,
        gt=0,
        description="memory a process may use, for the memory plan's check at start (default: the CUDA device's "
        "total memory, or on CPU the machine's or its cgroup's limit)",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch threads (default: the usable cores by affinity and cgroup CPU limit, at most 8, "
        "shared by the ranks on the machine)",
    )
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    teachers: dict[str, TeacherConfig] = Field(
        default_factory=dict,
        description="named teachers, each a `teacher` section: rows are scored (and guided) by the teacher their data "
        "names (data.train entries {path, teacher}, data.toy_teachers); the first is the default. Instead of "
        "`teacher`; all share the student's tokenizer and one top_k",
    )
    loss: LossConfig = Field(default_factory=LossConfig)
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    dist: DistConfig = Field(default_factory=DistConfig)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, tree):
        rollout = tree.get("rollout") if isinstance(tree, dict) else None
        if isinstance(rollout, dict) and "sample_batch_sequences" in rollout:
            raise ValueError(
                "rollout.sample_batch_sequences is now rollout.sample_batch_tokens, a bound in tokens of the KV "
                "cache (rows x (longest prompt + max_new_tokens)), which eval uses too: e.g. "
                "rollout.sample_batch_tokens=65536 (the default)"
            )
        if isinstance(tree, dict) and "tasks" in tree:
            raise ValueError("`tasks` is now `data.toy` (e.g. data.toy={math: 0.45, code: 0.25, general: 0.3})")
        loss = tree.get("loss") if isinstance(tree, dict) else None
        # alpha at its default is every written config's (config.yaml holds all keys): only another value is old
        if isinstance(loss, dict) and loss.get("method") == "reopold" and loss.get("alpha", TOPD_ALPHA) != TOPD_ALPHA:
            raise ValueError(
                "loss.alpha with method reopold was the proximal-teacher reward log(a*exp(d) + 1 - a), which is "
                "TOP-D's: use loss.method=topd (loss.alpha) for it; REOPOLD's own reward floor is loss.floor_lambda"
            )
        return tree

    @model_validator(mode="after")
    def _check(self):
        self._check_teachers()
        for name, teacher in self.teacher_sections().items():
            where = self.teacher_key(name)
            if teacher.api == "inprocess" and not teacher.model:
                raise ValueError(f"{where}.api inprocess needs {where}.model (the teacher model directory)")
            if teacher.api == "vllm-openai" and self._needs_drafts():
                raise ValueError(
                    f"{where}.api vllm-openai scores only; teacher drafts need the tropd service's /v1/continue: "
                    "set guidance.enabled=false (tropd), or use loss.method opd/eopd/reopold/topd, or gkd with "
                    "loss.on_policy_share=1"
                )
        toy = self.data.toy
        if self.data.source == "toy" and (not toy or any(w < 0 for w in toy.values()) or sum(toy.values()) <= 0):
            raise ValueError("data.toy: give at least one task with a positive weight")
        if self.data.source == "files" and not self.data.train:
            raise ValueError("data.source files needs data.train (prompt files or folders)")
        return self

    def teacher_sections(self) -> dict[str, TeacherConfig]:
        """The run's teachers by name: `teachers`, or the one `teacher` (named "teacher")."""
        return dict(self.teachers) if self.teachers else {"teacher": self.teacher}

    def teacher_key(self, name: str) -> str:
        """The config key of the teacher section `name` (`teacher`, or `teachers.NAME`), for messages."""
        return f"teachers.{name}" if self.teachers else "teacher"

    def top_k(self) -> int:
        """The teachers' top_k (one across teachers)."""
        return next(iter(self.teacher_sections().values())).top_k

    def _check_teachers(self) -> None:
        named = self.teachers
        wanted = [(f"data.train {file_path(e)}", file_teacher(e)) for e in self.data.train]
        wanted += [(f"data.eval {file_path(e)}", file_teacher(e)) for e in self.data.eval]
        wanted += [(f"data.toy_teachers.{task}", name) for task, name in self.data.toy_teachers.items()]
        for where, name in wanted:
            if name is not None and name not in named:
                known = f"the named teachers are {', '.join(named)}" if named else "no `teachers` are named"
                raise ValueError(f"{where} names teacher {name!r} but {known}")
        if not named:
            return
        if self.teacher != TeacherConfig():
            raise ValueError("both `teacher` and `teachers` are set: give one teacher as `teacher`, or several as "
                             "`teachers` (name: section)")  # fmt: skip
        for name in named:
            if not name or not all(c.isalnum() or c in "_-" for c in name):
                raise ValueError(f"teachers: name {name!r} must be letters, digits, _ or - (it names metrics)")
        top_k = {name: t.top_k for name, t in named.items()}
        if len(set(top_k.values())) > 1:
            raise ValueError(f"teachers: top_k differs ({', '.join(f'{n} {k}' for n, k in top_k.items())}): the "
                             "forward-KL terms of one batch need one top_k across teachers")  # fmt: skip
        vllm = [name for name, t in named.items() if t.api == "inprocess" and t.engine == "vllm"]
        if len(vllm) > 1:
            raise ValueError(f"teachers {', '.join(vllm)}: at most one in-process teacher may use engine vllm "
                             "(each would size its memory as if alone); serve the others with `tropd teacher "
                             "serve`")  # fmt: skip

    def _needs_drafts(self) -> bool:
        from trainer.methods import METHODS  # the table imports the losses (torch): only when a config is checked

        return METHODS[self.loss.method].needs_drafts(self)


def _set(tree: dict, dotted: str, value, defaults: dict) -> None:
    """Set `dotted` in `tree`; a section or mapping the tree lacks starts from its defaults, so that
    `tasks.math=0.5` changes one weight of the default mix instead of replacing the mix."""
    keys = dotted.split(".")
    if not all(keys):
        raise UserError(f"override {dotted + '=...'!r}: the key is empty or has an empty part")
    node = tree
    for key in keys[:-1]:
        defaults = defaults.get(key) if isinstance(defaults, dict) else None
        if key not in node:
            node[key] = dict(defaults) if isinstance(defaults, dict) else {}
        child = node[key]
        if not isinstance(child, dict):
            raise UserError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """The config from YAML `path` (or defaults) with `key=value` overrides (values parsed as YAML)."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise UserError(f"config file {path!r} is a directory")
        if not p.is_file():
            raise UserError(f"config file {path!r} not found")
        try:
            tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise UserError(f"config file {path!r} is not UTF-8 text") from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            raise UserError(
                f"config file {path!r} is not valid YAML{at}: {getattr(exc, 'problem', None) or exc}"
            ) from None
        if not isinstance(tree, dict):
            raise UserError(f"config file {path!r} must hold a mapping of keys to values")
    defaults = TrainConfig().model_dump(mode="json")
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like key=value (e.g. loss.tau=0.2)")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _set(tree, key.strip(), value, defaults)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            shown = f" (got {repr(err['input'])[:80]})" if where and "input" in err else ""  # not the whole config
            problems.append(f"{where or 'config'}: {err['msg'].removeprefix('Value error, ')}{shown}")
        raise UserError("bad config: " + "; ".join(problems)) from None


def dump_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))

"""Student scoring in bounded memory: the reductions the losses need, never a whole batch's float32 logits.

Scored the plain way, B sequences of T response tokens over a vocabulary of V need B*T*V float32 logits
(64 x 1024 x 151936 x 4 B = 40 GB). The losses only use per-position reductions over V (`losses.StudentScores`),
so `ScoringModule` applies the output head to `chunk_tokens` positions at a time, each chunk under activation
checkpointing: one chunk of logits exists at a time, in forward and in backward (which recomputes the chunk's
logits from its hidden states; the price is one more head matmul per chunk).

`StudentStep` adds micro-batches of sequences, exactly, also for losses with batch-level statistics (a quantile,
the highest-entropy share, the token count):
    scores():     z_m = module(micro-batch m) under no_grad, for each m;  z = cat_m z_m as leaves (requires_grad)
    backward(L):  g = dL/dz;  for each m:  z_m = module(micro-batch m) with grad;  backward(z_m, g_m)
Since dL/dtheta = sum_m (dz_m/dtheta)^T g_m, the gradients accumulated in the parameters are those of L on the
whole batch. The cost: one extra (no-grad) forward per step. Both passes must compute the same z, so dropout must
be off (causal LMs default to 0).

Shapes: B sequences, L padded sequence length, T response positions, H hidden size, V vocabulary, K teacher top-k,
N flattened positions (B*T) and C positions in one chunk.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from trainer.losses import StudentScores, student_scores

Fields = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The decoder body (input ids -> last hidden states) and the output head, or None when the model has neither."""
    try:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or decoder is model or head is None:
        return None
    return decoder, head


class ScoringModule(torch.nn.Module):
    """A causal LM whose forward returns the StudentScores fields of the response tokens, as a tuple
    `(lp_B_T, topk_lp_B_T_K1 | None, entropy_B_T | None, argmax_B_T | None)`: all computation happens inside
    forward, so DistributedDataParallel or FSDP2 `fully_shard` can wrap it.

    logits = head(decoder(input_ids)) at the response positions, then what the model's config asks for between the
    two, as transformers applies it: `logits_scaling` (Granite) z / s, `logit_scale` (Cohere) z * s,
    `final_logit_softcapping` (Gemma 2 and later) c tanh(z / c). A model whose decoder body or output head cannot be
    found (no `get_decoder()` / `model.model`, no `get_output_embeddings()`) is scored through `model(...).logits`
    instead: the same numbers, but its B*L*V logits exist at once. `chunk_tokens=0` scores every position in one
    chunk without checkpointing.
    """

    def __init__(self, model: torch.nn.Module, chunk_tokens: int = 1024, model_logits: bool = False):
        super().__init__()
        if chunk_tokens < 0:
            raise ValueError(f"chunk_tokens must be >= 0, got {chunk_tokens}")
        self.model = model
        self.chunk_tokens = chunk_tokens
        parts = _decoder_and_head(model)
        # `model_logits`: the model's own forward, all positions' logits at once (small vocabularies: the cheapest)
        self.uses_model_logits = parts is None or model_logits
        self.vocab_size = parts[1].weight.shape[0] if parts else model.config.get_text_config().vocab_size

    def _logits(self, head: torch.nn.Module, hidden_C_H: torch.Tensor) -> torch.Tensor:
        """The model's logits from its last hidden states, with the config's scaling and softcapping."""
        logits_C_V = head(hidden_C_H)
        config = self.model.config.get_text_config()
        if getattr(config, "logits_scaling", None):
            logits_C_V = logits_C_V / config.logits_scaling
        if getattr(config, "logit_scale", None):
            logits_C_V = logits_C_V * config.logit_scale
        if getattr(config, "final_logit_softcapping", None):
            cap = config.final_logit_softcapping
            logits_C_V = torch.tanh(logits_C_V / cap) * cap
        return logits_C_V

    def _chunk(self, head, hidden_C_H, targets_C, top_ids_C_K, entropy: bool, argmax: bool) -> Fields:
        """The reductions of one chunk; under checkpoint, its C*V logits are freed here and recomputed in backward."""
        s = student_scores(self._logits(head, hidden_C_H), targets_C, top_ids_C_K, entropy=entropy, argmax=argmax)
        return s.lp_B_T, s.topk_lp_B_T_K1, s.entropy_B_T, s.argmax_B_T

    def forward(
        self,
        input_ids_B_L: torch.Tensor,
        attention_mask_B_L: torch.Tensor,
        index_B_T: torch.Tensor | None = None,
        targets_B_T: torch.Tensor | None = None,
        top_ids_B_T_K: torch.Tensor | None = None,
        entropy: bool = False,
        argmax: bool = False,
        lm: dict | None = None,
    ) -> Fields:
        """Position index_B_T[b, t] of the sequence predicts targets_B_T[b, t] (response token t).
        With `lm` (keyword arguments of the model's forward) it returns the model's own output instead: the sampler
        runs through here under FSDP, so that the sharded root gathers its parameters."""
        if lm is not None:
            return self.model(input_ids=input_ids_B_L, attention_mask=attention_mask_B_L, **lm)
        B, T = targets_B_T.shape
        parts = None if self.uses_model_logits else _decoder_and_head(self.model)
        if parts is None:
            logits_B_L_V = self.model(input_ids=input_ids_B_L, attention_mask=attention_mask_B_L).logits
            logits_B_T_V = logits_B_L_V.gather(1, index_B_T[:, :, None].expand(-1, -1, logits_B_L_V.shape[-1]))
            s = student_scores(logits_B_T_V, targets_B_T, top_ids_B_T_K, entropy=entropy, argmax=argmax)
            return s.lp_B_T, s.topk_lp_B_T_K1, s.entropy_B_T, s.argmax_B_T
        decoder, head = parts
        out = decoder(input_ids=input_ids_B_L, attention_mask=attention_mask_B_L, use_cache=False)
        hidden_B_L_H = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        H = hidden_B_L_H.shape[-1]
        hidden_N_H = hidden_B_L_H.gather(1, index_B_T[:, :, None].expand(-1, -1, H)).reshape(B * T, H)
        targets_N = targets_B_T.reshape(B * T)
        top_ids_N_K = top_ids_B_T_K.reshape(B * T, -1) if top_ids_B_T_K is not None else None
        size = self.chunk_tokens or max(1, B * T)
        chunks = []
        for start in range(0, max(1, B * T), size):
            rows = slice(start, start + size)
            args = (head, hidden_N_H[rows], targets_N[rows], top_ids_N_K[rows] if top_ids_N_K is not None else None)
            if self.chunk_tokens and torch.is_grad_enabled():
                chunks.append(checkpoint(self._chunk, *args, entropy, argmax, use_reentrant=False))
            else:
                chunks.append(self._chunk(*args, entropy, argmax))
        fields = (torch.cat(field).reshape(B, T, *field[0].shape[1:]) if field[0] is not None else None
                  for field in zip(*chunks, strict=True))  # fmt: skip
        return tuple(fields)


class LanguageModelView(torch.nn.Module):
    """The causal LM behind a (sharded) ScoringModule, called like the model itself: `view(input_ids=...,
    attention_mask=..., past_key_values=..., ...)` runs `root(..., lm=...)`, so FSDP2's hooks on the root gather
    the parameters it holds (embeddings, head) as well as each layer's."""

    def __init__(self, root: torch.nn.Module):
        super().__init__()
        self.root = root

    @property
    def config(self):
        return _unwrapped(self.root).model.config

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
        return self.root(input_ids, attention_mask, lm={**kwargs, "logits_to_keep": logits_to_keep})


def sequence_inputs(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(input_ids_B_L, attention_mask_B_L, index_B_T, targets_B_T, mask_B_T)` of prompt + response sequences,
    right-padded with `pad_id` (L = longest sequence, T = longest response). index_B_T[b, t] = len(prompt_b) - 1 + t
    is the position whose prediction is response token t; padding positions point at len(prompt_b) - 1 and target
    `pad_id`. The layout of `trainer.rollout.sampling.response_forward`."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need as many prompts as responses (at least one), got {len(prompts)} and {len(responses)}")
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token (the first response token is predicted from it)")
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    B, L, T = len(seqs), max(len(s) for s in seqs), max(len(r) for r in responses)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    index = torch.zeros((B, T), dtype=torch.long)
    targets = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, : len(p) + len(r)] = 1
        index[i] = len(p) - 1
        index[i, : len(r)] += torch.arange(len(r))
        targets[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return tuple(x.to(device) for x in (input_ids, attention_mask, index, targets, mask))


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The ScoringModule inside a DistributedDataParallel wrapper (FSDP2 keeps the module itself)."""
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


class StudentStep:
    """One optimizer step's forward and backward of the student over a batch of (prompt, response) sequences,
    in micro-batches of `micro_batch_sequences` sequences (0: the whole batch at once); see the module docstring.

        step = StudentStep(module, prompts, responses, pad_id, top_ids_B_T_K, micro_batch_sequences=4)
        loss, metrics = losses.tropd(step.scores(), step.ids_B_T, ..., step.mask_B_T, ...)
        step.backward(loss if torch.isfinite(loss) else None)    # then optimizer.step()

    With one micro-batch, scores() is the module's output with its graph and backward(loss) is loss.backward().
    With several, scores() returns leaves and backward(loss) reruns each micro-batch with grad; under DDP all but
    the last micro-batch run inside `module.no_sync()` (FSDP2: `set_requires_gradient_sync(False)`).
    backward(None) runs a backward through the module with zero gradients (every data-parallel rank must run one).
    Reductions at positions off `mask_B_T` are unspecified. `autocast_dtype` (e.g. torch.bfloat16) runs the module
    under torch.autocast; the reductions are float32 whatever it is.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        prompts: list[list[int]],
        responses: list[list[int]],
        pad_id: int,
        top_ids_B_T_K: torch.Tensor | None = None,
        *,
        micro_batch_sequences: int = 0,
        entropy: bool = False,
        argmax: bool = False,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
    ):
        if micro_batch_sequences < 0:
            raise ValueError(f"micro_batch_sequences must be >= 0, got {micro_batch_sequences}")
        _, _, _, self.ids_B_T, self.mask_B_T = sequence_inputs(prompts, responses, pad_id, device)
        B, T = self.mask_B_T.shape
        if top_ids_B_T_K is not None and tuple(top_ids_B_T_K.shape[:2]) != (B, T):
            raise ValueError(f"top_ids_B_T_K has shape {tuple(top_ids_B_T_K.shape)}, expected ({B}, {T}, K)")
        self.module, self.prompts, self.responses, self.pad_id = module, prompts, responses, pad_id
        self.top_ids_B_T_K = top_ids_B_T_K.to(device) if top_ids_B_T_K is not None else None
        self.entropy, self.argmax, self.device, self.autocast_dtype = (
            entropy,
            argmax,
            torch.device(device),
            autocast_dtype,
        )
        size = micro_batch_sequences or B
        self.micro_batches = [slice(start, min(start + size, B)) for start in range(0, B, size)]
        self._fields: Fields | None = None

    def _run(self, rows: slice) -> Fields:
        input_ids, attention_mask, index, targets, _ = sequence_inputs(
            self.prompts[rows], self.responses[rows], self.pad_id, self.device
        )
        top_ids = self.top_ids_B_T_K[rows, : targets.shape[1]] if self.top_ids_B_T_K is not None else None
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())  # fmt: skip
        with autocast:
            return self.module(input_ids, attention_mask, index, targets, top_ids, self.entropy, self.argmax)

    def scores(self) -> StudentScores:
        """The student's reductions for the whole batch (B_T shapes of `mask_B_T`)."""
        if len(self.micro_batches) == 1:
            self._fields = self._run(self.micro_batches[0])
        else:
            with torch.no_grad():
                parts = [self._run(rows) for rows in self.micro_batches]
            self._fields = tuple(self._place(i, parts) for i in range(4))
        return StudentScores(*self._fields, vocab_size=_unwrapped(self.module).vocab_size)

    def _place(self, i: int, parts: list[Fields]) -> torch.Tensor | None:
        """Field i of the micro-batches at their rows and first T_m positions of the whole batch."""
        if parts[0][i] is None:
            return None
        first = parts[0][i]
        full = first.new_zeros((*self.mask_B_T.shape, *first.shape[2:]))
        for rows, part in zip(self.micro_batches, parts, strict=True):
            full[rows, : part[i].shape[1]] = part[i]
        return full.requires_grad_() if i < 2 else full  # lp and top-k log-probs carry the gradient

    def backward(self, loss: torch.Tensor | None) -> None:
        """Accumulate d loss / d parameters (zero gradients when loss is None) into the module's parameters."""
        if self._fields is None:
            raise RuntimeError("StudentStep.backward needs scores() first")
        fields, self._fields = [f for f in self._fields[:2] if f is not None], None
        if len(self.micro_batches) == 1:
            if loss is not None:
                loss.backward()
            else:
                torch.autograd.backward(fields, [torch.zeros_like(f) for f in fields])
            return
        grads = [None] * len(fields)
        if loss is not None and loss.requires_grad:
            grads = torch.autograd.grad(loss, fields, allow_unused=True)
        grads = [torch.zeros_like(f) if g is None else g for f, g in zip(fields, grads, strict=True)]
        last = len(self.micro_batches) - 1
        for m, rows in enumerate(self.micro_batches):
            with self._sync(m == last):
                outputs = [f for f in self._run(rows)[:2] if f is not None]
                grad_outputs = [g[rows, : f.shape[1]] for f, g in zip(outputs, grads, strict=True)]
                torch.autograd.backward(outputs, grad_outputs)

    def _sync(self, sync: bool):
        """Gradient synchronisation across data-parallel ranks only on the last micro-batch."""
        if hasattr(self.module, "set_requires_gradient_sync"):  # FSDP2
            self.module.set_requires_gradient_sync(sync)
        if sync or not hasattr(self.module, "no_sync"):
            return contextlib.nullcontext()
        return self.module.no_sync()

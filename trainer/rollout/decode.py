"""Incremental decoding of a causal LM with a KV cache, behind two calls: `prefill` and `step`.

`LibraryDecoder` drives the model's own forward and cache: any `AutoModelForCausalLM`, on any device.
`StaticDecoder` drives the same forward over a static cache, its step compiled (`rollout.compile`).
`LlamaDecoder` does the same arithmetic as `LlamaForCausalLM` (RMSNorm, rotary positions, grouped attention,
SiLU MLP, tied or untied head) in plain torch on the model's own parameters, without the library's per-call
overhead (masks, cache objects and output containers built for one token at a time); tests check its logits
against the library's forward. That overhead is what a very small model spends most of a rollout in, so the
hand-written path pays only there: `decoder_for(model)` picks it by a measured size rule (`fast_decoder_pays`).

Shapes: B rows, P padded prompt length, N cache length (P + generated), E hidden, H heads, G key/value
heads, D head size, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tropd.errors import UserError

PREFERENCES = ("auto", "fast", "library")

# LlamaDecoder beats the library's cache path only where per-call overhead outweighs arithmetic. Measured through
# `sample` on CPU, 2 torch threads, 64 toy prompts (8-16 tokens), 48 new tokens, float32, random weights; tok/s
# LlamaDecoder / library (ratio), best of 3-4 runs in turn (`trainer.bench.speed.decoder_speed` measures the two ends):
#   hidden x layers      quiet machine               busy machine (other jobs on the same 2 cores)
#   96 x 3 (toy, 0.45M)  21,310 / 15,358 (1.39)      12,746 / 11,009 (1.16)
#   128 x 4 .. 256 x 4   1.04 - 1.14                 1.10 - 1.20
#   256 x 6, 384 x 4     2,501 / 2,184 (1.15), 1.07  3,063 / 2,642 (1.16), 1.02
#   256 x 8, 320 x 6     1.06 - 1.56, 1.14           366 / 1,205 (0.30), 1.08
#   384 x 6, 512 x 4     0.98 - 1.12, 0.91           95 / 167 (0.57), 227 / 465 (0.49)
#   512 x 8 (29M)        914 / 751 (1.22), 0.97-1.06 (an earlier measurement: 666 / 1,127)
# Up to hidden_size * num_hidden_layers = 1,536 it was never slower; above, from 0.9x to 1.5x on a quiet machine and
# 2-3x slower on a busy one (2 threads on cores that other jobs hold: its many small ops wait on each other).
# On CUDA the library path always (its fused kernels; the plain loop is launch-bound).
FAST_DECODER_MAX_WIDTH_X_DEPTH = 1536


def _parameters_device(model) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _sharded(model) -> bool:
    """Whether some parameter is a distributed tensor (FSDP2): only the model's own forward gathers its shards."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def fast_decoder_supports(model) -> bool:
    """Whether `LlamaDecoder` computes exactly what `model`'s forward does: a plain Llama (default rotary
    positions, SiLU) with ordinary, unsharded parameters."""
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if config is None or inner is None or getattr(config, "model_type", None) != "llama":
        return False
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", None) != "default" or config.hidden_act != "silu":
        return False
    return not _sharded(model)


def fast_decoder_pays(model) -> bool:
    """The measured rule: on CPU, `hidden_size * num_hidden_layers <= FAST_DECODER_MAX_WIDTH_X_DEPTH`."""
    if _parameters_device(model).type != "cpu":
        return False
    return model.config.hidden_size * model.config.num_hidden_layers <= FAST_DECODER_MAX_WIDTH_X_DEPTH


def compile_supported(model) -> bool:
    """Whether `StaticDecoder` can run `model`: a library model whose forward compiles over a static cache
    (`_can_compile_fullgraph`, set by transformers per architecture) with ordinary, unsharded parameters."""
    return bool(getattr(model, "_can_compile_fullgraph", False)) and not _sharded(model)


def resolve_compile(choice: bool | str, model) -> bool:
    """`rollout.compile` for this student: "auto" compiles on CUDA where it is supported (on CPU the compilation,
    about 10 s a batch shape for the toy student, costs more than it saves); True where it is not supported is a
    UserError."""
    if choice == "auto":
        return _parameters_device(model).type == "cuda" and compile_supported(model)
    if choice and not compile_supported(model):
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        why = "it is sharded (FSDP)" if _sharded(model) else f"transformers cannot compile {kind!r} over a static cache"
        raise UserError(f"rollout.compile=true but {why}: use rollout.compile=auto or false")
    return bool(choice)


def decoder_for(model, prefer: str = "auto", compiled: bool = False) -> LlamaDecoder | LibraryDecoder | StaticDecoder:
    """The decoder that samples `model`: with `compiled`, `StaticDecoder`; else "auto" takes `LlamaDecoder` where it is
    supported and measured faster (see `FAST_DECODER_MAX_WIDTH_X_DEPTH`), `LibraryDecoder` otherwise; "fast" and
    "library" force one."""
    if prefer not in PREFERENCES:
        raise UserError(f"decoder must be one of {', '.join(PREFERENCES)}, not {prefer!r}")
    if compiled:
        return StaticDecoder(model)
    if prefer == "library":
        return LibraryDecoder(model)
    supported = fast_decoder_supports(model)
    if prefer == "fast":
        if not supported:
            kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise UserError(f"the fast decoder supports plain Llama models only, not {kind!r}: use decoder=library")
        return LlamaDecoder(model)
    return LlamaDecoder(model) if supported and fast_decoder_pays(model) else LibraryDecoder(model)


class LlamaDecoder:
    """prefill(ids_B_P, mask_B_P, positions_B_P) -> logits_B_V of the last prompt position; then
    step(tokens_B, positions_B) -> logits_B_V of the next token, one call per generated token."""

    def __init__(self, model):
        config, inner = model.config, model.model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.head = model.lm_head
        self.inv_freq = inner.rotary_emb.inv_freq.float()
        self.rope_scale = float(inner.rotary_emb.attention_scaling)
        self.layers = inner.layers
        self.scale = self.head_dim**-0.5
        self.qkv_sizes = (self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim)
        # q, k, v as one matrix product and gate, up as another: fewer small products per token (the weights are
        # the training ones of this moment; a decoder lives for one batch of rollouts)
        self.fused = [self._fuse(layer) for layer in self.layers]
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.valid_B_N: torch.Tensor | None = None
        self.length = 0

    @staticmethod
    def _fuse(layer):
        attn, mlp = layer.self_attn, layer.mlp

        def joined(*linears):
            weight = torch.cat([m.weight for m in linears])
            bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
            return weight, bias

        return (*joined(attn.q_proj, attn.k_proj, attn.v_proj), attn.o_proj, *joined(mlp.gate_proj, mlp.up_proj),
                mlp.down_proj)  # fmt: skip

    def _attend(self, q_B_H_S_D, k_B_G_N_D, v_B_G_N_D, mask_B_1_S_N):
        """Softmax attention over the cache; at a few dozen positions the explicit products beat the fused kernel."""
        if self.kv_heads != self.heads:
            k_B_G_N_D = k_B_G_N_D.repeat_interleave(self.heads // self.kv_heads, 1)
            v_B_G_N_D = v_B_G_N_D.repeat_interleave(self.heads // self.kv_heads, 1)
        if q_B_H_S_D.shape[2] > 1:  # prefill
            scores = (q_B_H_S_D @ k_B_G_N_D.transpose(-1, -2)) * self.scale
            weights = scores.masked_fill(~mask_B_1_S_N, float("-inf")).softmax(-1, dtype=torch.float32)
            return weights.to(q_B_H_S_D.dtype) @ v_B_G_N_D
        # one query per row: broadcast products are cheaper than many tiny batched matrix products
        scores_B_H_N = (q_B_H_S_D * k_B_G_N_D).sum(-1) * self.scale
        weights = scores_B_H_N.masked_fill(~mask_B_1_S_N[:, :, 0], float("-inf")).softmax(-1, dtype=torch.float32)
        return (weights.to(q_B_H_S_D.dtype)[..., None] * v_B_G_N_D).sum(-2, keepdim=True)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), -1)
        return (angles.cos() * self.rope_scale).to(dtype), (angles.sin() * self.rope_scale).to(dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    def _forward(self, x_B_S_E: torch.Tensor, positions_B_S: torch.Tensor, attend_B_S_N: torch.Tensor) -> torch.Tensor:
        """Run the layers on S new positions written at cache slots [length, length + S)."""
        B, S, _ = x_B_S_E.shape
        cos, sin = self._rope(positions_B_S, x_B_S_E.dtype)
        cos, sin = cos[:, None], sin[:, None]  # B 1 S D
        lo, hi = self.length, self.length + S
        mask = attend_B_S_N[:, None, :, :hi]
        for i, layer in enumerate(self.layers):
            qkv_w, qkv_b, o_proj, up_w, up_b, down = self.fused[i]
            h = self._rms(x_B_S_E, layer.input_layernorm.weight)
            q, k, v = F.linear(h, qkv_w, qkv_b).split(self.qkv_sizes, -1)
            q = q.view(B, S, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            self.keys[i][:, :, lo:hi] = k
            self.values[i][:, :, lo:hi] = v
            out = self._attend(q, self.keys[i][:, :, :hi], self.values[i][:, :, :hi], mask)
            x_B_S_E = x_B_S_E + o_proj(out.transpose(1, 2).reshape(B, S, -1))
            h = self._rms(x_B_S_E, layer.post_attention_layernorm.weight)
            gate, up = F.linear(h, up_w, up_b).chunk(2, -1)
            x_B_S_E = x_B_S_E + down(F.silu(gate) * up)
        self.length = hi
        return self.head(self._rms(x_B_S_E[:, -1], self.norm))

    def prefill(self, ids_B_P: torch.Tensor, mask_B_P: torch.Tensor, positions_B_P: torch.Tensor, extra: int):
        """Start a batch of left-padded prompts, with room for `extra` generated tokens."""
        B, P = ids_B_P.shape
        dtype, device = self.embed.dtype, self.embed.device
        shape = (B, self.kv_heads, P + extra, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.valid_B_N = torch.zeros((B, P + extra), dtype=torch.bool, device=device)
        self.valid_B_N[:, :P] = mask_B_P.bool()
        self.length = 0
        causal_P_P = torch.ones((P, P), dtype=torch.bool, device=device).tril()
        # a padding query sees itself too, so that no attention row is empty (an empty row gives NaN)
        attend = (causal_P_P & self.valid_B_N[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)
        attend_B_P_N = F.pad(attend, (0, extra), value=False)
        return self._forward(F.embedding(ids_B_P, self.embed), positions_B_P, attend_B_P_N)

    def keep(self, rows: torch.Tensor) -> torch.Tensor:
        """Keep only `rows` of the batch (finished rows leave it); returns the rows kept."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.valid_B_N = self.valid_B_N[rows]
        return rows

    def step(self, tokens_B: torch.Tensor, positions_B: torch.Tensor) -> torch.Tensor:
        self.valid_B_N[:, self.length] = True
        attend_B_1_N = self.valid_B_N[:, None, :]
        return self._forward(F.embedding(tokens_B[:, None], self.embed), positions_B[:, None], attend_B_1_N)


class LibraryDecoder:
    """The same prefill/step calls through the model's own forward and cache, for any causal LM. Only the last
    position's logits are computed (`logits_to_keep=1`), so a prefill of B prompts of P tokens holds B x V logits,
    not B x P x V (Qwen's 151,936-row head makes the latter tens of GB)."""

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.mask_B_N: torch.Tensor | None = None
        self.last_only = {"logits_to_keep": 1} if _takes(model, "logits_to_keep") else {}

    def _run(self, ids, positions) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=self.mask_B_N, position_ids=positions,
                         past_key_values=self.cache, use_cache=True, **self.last_only)  # fmt: skip
        self.cache = out.past_key_values
        return out.logits[:, -1, :]

    def prefill(self, ids_B_P: torch.Tensor, mask_B_P: torch.Tensor, positions_B_P: torch.Tensor, extra: int):
        self.cache, self.mask_B_N = None, mask_B_P
        return self._run(ids_B_P, positions_B_P)

    def step(self, tokens_B: torch.Tensor, positions_B: torch.Tensor) -> torch.Tensor:
        self.mask_B_N = torch.cat([self.mask_B_N, torch.ones_like(self.mask_B_N[:, :1])], dim=-1)
        return self._run(tokens_B[:, None], positions_B[:, None])

    def keep(self, rows: torch.Tensor) -> torch.Tensor | None:
        """Keep only `rows` of the batch (finished rows leave it); returns the rows kept, None where the cache cannot
        select rows (then the batch stays as it is)."""
        if not hasattr(self.cache, "batch_select_indices"):
            return None
        self.cache.batch_select_indices(rows)
        self.mask_B_N = self.mask_B_N[rows]
        return rows


# A static cache's length is rounded up to a multiple of this, and rows leave a compiled batch only at power-of-two
# sizes: the compiled step then meets few shapes (each new one compiles again, and on CUDA records a new graph).
STATIC_CACHE_ROUND = 128


class StaticDecoder:
    """The model's own forward over a static KV cache (transformers' `StaticCache`: fixed rows x length, updated in
    place), its one-token step compiled with `torch.compile` (on CUDA with CUDA graphs, "reduce-overhead"): no
    per-token allocation, Python overhead or kernel launches one by one. The attention mask covers the whole cache
    (slots not yet written are masked). Rows that have finished leave the batch only when the running ones fit a
    smaller power of two; the rest of that size is filled with finished rows, whose tokens the sampler ignores."""

    def __init__(self, model):
        self.model = model
        self.step_fn = _compiled_forward(model)
        self.cache = None
        self.mask_B_N: torch.Tensor | None = None
        self.length = 0

    def prefill(self, ids_B_P: torch.Tensor, mask_B_P: torch.Tensor, positions_B_P: torch.Tensor, extra: int):
        from transformers import StaticCache

        B, P = ids_B_P.shape
        N = -(-(P + extra) // STATIC_CACHE_ROUND) * STATIC_CACHE_ROUND
        self.cache = StaticCache(config=self.model.config, max_cache_len=N)
        self.mask_B_N = torch.zeros((B, N), dtype=mask_B_P.dtype, device=mask_B_P.device)
        self.mask_B_N[:, :P] = mask_B_P
        self.length = P
        out = self.model(input_ids=ids_B_P, attention_mask=self.mask_B_N, position_ids=positions_B_P,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)  # fmt: skip
        return out.logits[:, -1, :]

    def step(self, tokens_B: torch.Tensor, positions_B: torch.Tensor) -> torch.Tensor:
        self.mask_B_N[:, self.length] = 1
        self.length += 1
        out = self.step_fn(input_ids=tokens_B[:, None], attention_mask=self.mask_B_N, position_ids=positions_B[:, None],
                           past_key_values=self.cache, use_cache=True, logits_to_keep=1)  # fmt: skip
        return out.logits[:, -1, :].clone()  # a CUDA graph's output is overwritten by its next replay

    def keep(self, rows: torch.Tensor) -> torch.Tensor | None:
        """Keep `rows` and as many finished rows as fill the next power of two at or above their number; None (the
        batch unchanged) when that is not smaller than the batch."""
        B = self.mask_B_N.shape[0]
        size = 1 << (len(rows) - 1).bit_length()
        if size >= B:
            return None
        leaving = torch.ones(B, dtype=torch.bool, device=rows.device)
        leaving[rows] = False
        kept = torch.cat([rows, leaving.nonzero()[: size - len(rows), 0]])
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[kept], layer.values[kept]
            layer.batch_size = size
            torch._dynamo.mark_static_address(layer.keys)
            torch._dynamo.mark_static_address(layer.values)
        self.mask_B_N = self.mask_B_N[kept]
        return kept


_COMPILED: dict[int, tuple[object, object]] = {}


def _compiled_forward(model):
    """`torch.compile` of `model.forward`, made once per model (its compiled graphs are kept across batches)."""
    import weakref

    entry = _COMPILED.get(id(model))
    if entry is None or entry[0]() is not model:
        mode = "reduce-overhead" if _parameters_device(model).type == "cuda" else None
        entry = (weakref.ref(model), torch.compile(model.forward, dynamic=False, mode=mode))
        _COMPILED[id(model)] = entry
    return entry[1]


def _takes(model, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False

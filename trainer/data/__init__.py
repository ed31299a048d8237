"""Where prompts come from: `source` (the `Prompt` and the `PromptSource` protocol every source implements),
`files` (the user's JSONL / JSON / Parquet / save_to_disk files, read with the student's tokenizer and chat
template) and `verifiers` (exact, math, a user's Python function).

May import: `trainer.config` and `tropd` helpers. Never the loop, the rollout engines, the toy world (which
implements `PromptSource`, one level up) or the benchmarks.
"""

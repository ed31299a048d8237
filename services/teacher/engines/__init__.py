"""The teacher's engines: `types` (the items and results every engine speaks), `hf` (transformers: the
reference and the fallback), `vllm` (the production engine), `load` (an engine by name, with the fallback) and
`inprocess` (an engine in a trainer's process, behind the same calls as the HTTP client).

May import: torch, transformers, vLLM, numpy and `tropd` helpers. Never the app, the batcher or the benchmarks.
"""

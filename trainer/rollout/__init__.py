"""The engines that sample the student: `sampling` (batches of rows, temperature, top-p, stops, banned ids) over
`decode` (the prefill and one-token steps of a causal LM: the library's forward, or a hand-written Llama decoder).

May import: torch, transformers, `tropd` helpers and the trainer's leaves (`trainer.config`). Never the loop
(`trainer.train`, `pipeline`), the data sources, the toy world or the benchmarks.
"""

"""The student trainer. Here, the loop and its parts: `config`, `train` (the loop), `pipeline` (batches in flight),
`methods` and `losses`, `student` (the student's scores), `teacher_link`, `evaluation`, `parallel`, `models`,
`checkpoint`, `rundir`, `runlog`, `plot`; `run` assembles a run (the prompt sources by name) and `cli` holds the
wing's commands. The rooms below: `rollout/` (sampling the student), `data/` (prompt sources and verifiers),
`toy/` (the offline toy world) and `bench/` (benchmarks). Imports go down only: cli -> bench -> run -> toy ->
data -> the loop's leaves; the loop never imports the toy world or the benchmarks (tests/test_imports.py).
"""

"""`tropd bench trainer` (`speed`: async vs strict, service vs in-process, rollout tokens/s; `memory`: peak
memory of a training step) and `tropd bench methods` (`methods`: every method tuned on the toy world, with its
`report`, `plots` and the greedy-answer `probe`).

Above everything it measures: it may import the loop, the toy world and the service's launcher; nothing but the
CLI imports it.
"""

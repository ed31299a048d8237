"""Fair sharing of the engine between clients: one queue per client, served by weighted fair queuing.

Start-time fair queuing: each request gets a virtual start tag when it is queued,

    start_j  = max(V, finish_prev)        finish_j = start_j + tokens_j / weight_client

(`finish_prev`: the finish tag of the same client's previous request), and requests are served in order of
start tag, V being the start tag of the last request served. A client that queues many requests at once gets
start tags far in the virtual future; a client that arrives later starts at V, so its request is served with
the next batch however deep the first one's backlog. While clients are backlogged each gets engine tokens
in proportion to its weight; a client that asks for less than its share gets all it asks for, and the
others share the rest (work-conserving). With `policy="fcfs"` the tag is the arrival order: the single
queue of first come, first served, kept for comparison (`tropd bench teacher --fair-share`).

Pure data structure, no locking: the batcher calls it under its own lock.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

POLICIES = ("fair", "fcfs")


@dataclass
class _Client:
    queue: deque = field(default_factory=deque)
    last_finish: float = 0.0
    tokens: int = 0  # of the jobs queued


class FairQueue:
    """Jobs (any object with `client`, `tokens` and a writable `tag`) queued per client.

    `push` tags a job; `pop_next(accept)` removes and returns the job with the smallest tag among the
    clients' first jobs that `accept` takes (a client's jobs are served in its own order), or None.
    """

    def __init__(self, policy: str = "fair", weights: dict[str, float] | None = None):
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r}: choose {' or '.join(POLICIES)}")
        self.policy = policy
        self.weights = dict(weights or {})
        self.virtual_time = 0.0
        self._clients: dict[str, _Client] = {}
        self._arrivals = itertools.count()
        self._held = 0  # jobs popped to be put back (`hold`, `requeue`): while any is, the busy period goes on

    def __len__(self) -> int:
        return sum(len(c.queue) for c in self._clients.values())

    def queued_tokens(self) -> dict[str, int]:
        """Tokens queued per client with work queued."""
        return {name: c.tokens for name, c in self._clients.items() if c.queue}

    def depth(self, client: str) -> int:
        state = self._clients.get(client)
        return len(state.queue) if state else 0

    def weight(self, client: str) -> float:
        return self.weights.get(client, 1.0)

    def push(self, job) -> None:
        if not len(self) and not self._held:  # no contention: a new busy period, in which everyone starts even
            self.virtual_time = max([self.virtual_time, *(c.last_finish for c in self._clients.values())])
            self._clients.clear()
        state = self._clients.setdefault(job.client, _Client())
        if self.policy == "fcfs":
            job.tag = float(next(self._arrivals))
        else:
            job.tag = max(self.virtual_time, state.last_finish)
            state.last_finish = job.tag + job.tokens / self.weight(job.client)
        state.queue.append(job)
        state.tokens += job.tokens

    def hold(self) -> None:
        """The job just popped will be put back (`requeue`) or given up (`release`): until then the queue is not
        idle, so a client that queues meanwhile does not begin a new busy period that forgets the held job's
        client."""
        self._held += 1

    def release(self) -> None:
        """A held job was put back or given up."""
        self._held -= 1

    def requeue(self, job, served: int) -> None:
        """Put `job`, popped and held, back at the head of its client's queue, `served` of its tokens served (a long
        sequence scored a chunk at a time): it keeps its place in its client's order, its tag moved on by what
        was served, its finish tag unchanged. The caller then `release`s it."""
        state = self._clients.setdefault(job.client, _Client())
        job.tokens -= served
        if self.policy != "fcfs":
            job.tag += served / self.weight(job.client)
            state.last_finish = max(state.last_finish, job.tag + job.tokens / self.weight(job.client))
        state.queue.appendleft(job)
        state.tokens += job.tokens

    def pop_next(self, accept: Callable[[object], bool] = lambda job: True):
        heads = [c.queue[0] for c in self._clients.values() if c.queue and accept(c.queue[0])]
        if not heads:
            return None
        job = min(heads, key=lambda j: j.tag)
        state = self._clients[job.client]
        state.queue.popleft()
        state.tokens -= job.tokens
        self.virtual_time = max(self.virtual_time, job.tag)
        # forget idle clients whose finish tag V has passed (they would start at V anyway): bounded state
        idle = [c for c, st in self._clients.items() if not st.queue and st.last_finish <= self.virtual_time]
        for client in idle:
            del self._clients[client]
        return job

    def drain(self) -> list:
        """Remove and return every queued job (in tag order)."""
        jobs = sorted((j for c in self._clients.values() for j in c.queue), key=lambda j: j.tag)
        self._clients.clear()
        return jobs

"""`tropd bench teacher`: `throughput` (the service against its engine and vLLM's stock server), `alone`
(each path in a process of its own), `passes` (the timed paths) and `fair` (the fair-share benchmark).

Above what it measures: it may import the engines, the client and the launcher; only the service's CLI imports it.
"""

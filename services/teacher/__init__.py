"""The teacher scoring service: per-token log-probs, top-k and continuations over HTTP."""

"""The student trainer: rollouts, trust-region losses, pipeline, checkpoints, and the offline toy world."""

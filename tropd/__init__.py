"""TrOPD: Trust Region On-Policy Distillation."""

__version__ = "0.1.0"

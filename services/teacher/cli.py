"""Subcommands of the teacher wing: `tropd teacher serve`, `tropd bench teacher`."""

from __future__ import annotations


def add_teacher(sub) -> None:
    return None


def add_bench(sub) -> None:
    return None

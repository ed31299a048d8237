"""The `tropd` command: dispatches to the toy world, the teacher service, the trainer and the benchmarks.

Each wing registers its subcommands here; its heavy modules (torch, vLLM, FastAPI) load only when one of
its subcommands runs, so `tropd --help` is instant.
"""

from __future__ import annotations

import argparse
import sys

from tropd import __version__
from tropd.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (and exit status 2) instead of a usage dump."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> Parser:
    from services.teacher import cli as teacher_cli
    from trainer import cli as trainer_cli
    from tropd.fetch import add_models

    parser = Parser(
        prog="tropd",
        description="Trust Region On-Policy Distillation: a teacher scoring service and a student trainer.",
    )
    parser.add_argument("--version", action="version", version=f"tropd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser, required=True)
    trainer_cli.add_toy(sub)
    teacher_cli.add_teacher(sub)
    trainer_cli.add_train(sub)
    trainer_cli.add_demo(sub)
    add_models(sub)
    bench = sub.add_parser("bench", help="benchmarks that print measured ratios side by side")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH", parser_class=Parser, required=True)
    teacher_cli.add_bench(bench_sub)
    trainer_cli.add_bench(bench_sub)
    trainer_cli.add_bench_methods(bench_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse ends a command's key=value list at its first option (`train steps=3 --resume out=x`):
        # the overrides after it come back here, in order, and join the list
        if isinstance(getattr(args, "overrides", None), list) and all(
            "=" in item and not item.startswith("-") for item in extra
        ):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"tropd: error: {exc}", file=sys.stderr)
        return 2
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        # a path the user gave that cannot be used as given; the commands check most of them first
        print(f"tropd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tropd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

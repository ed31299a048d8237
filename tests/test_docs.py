"""The documents against the code: every command, option, default and config key that README.md and
SECURITY.md name exists with the value they give, links between documents resolve, and the few rules the
documents state in numbers hold. Fast: parsers, schemas and pure checks, no service."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]

# options of other programs that the README names beside ours
FOREIGN_OPTIONS = {
    "--nproc-per-node",  # torchrun
    "--skip-tokenizer-init",  # vLLM's stock server
    "--return-tokens-as-token-ids",  # vLLM's stock server
    "--scale",  # docker compose
    "--profile",  # docker compose
    "--collect-only",  # pytest
}


def _parser() -> argparse.ArgumentParser:
    from tropd.cli import build_parser

    return build_parser()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _all_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("tropd",)):
    yield path, parser
    for name, sub in _subcommands(parser).items():
        yield from _all_parsers(sub, (*path, name))


def _code_spans(text: str) -> list[str]:
    """Fenced code blocks (one entry per logical line: indented lines continue the previous one) and inline code
    spans (which may cross a line break)."""
    spans = []
    for block in re.findall(r"^ *```[^\n]*\n(.*?)^ *```", text, flags=re.S | re.M):
        for line in block.splitlines():
            if line[:1].isspace() and spans and line.strip():
                spans[-1] += " " + line.strip()
            else:
                spans.append(line)
    prose = re.sub(r"^ *```[^\n]*\n.*?^ *```", "", text, flags=re.S | re.M)
    spans += [s.replace("\n", " ") for s in re.findall(r"`([^`]+)`", prose)]
    return spans


def _command_uses(text: str) -> list[tuple[str, tuple[str, ...], list[str]]]:
    """(span, subcommand path, options given after it) of every `tropd ...` command line in `text`'s code."""
    uses = []
    for span in _code_spans(text):
        span = span.split(" #", 1)[0]
        for match in re.finditer(r"(?:^|[\s/])tropd((?:\s+\S+)*)", span):
            words = match.group(1).split()
            uses.append((span, words))
    parser, out = _parser(), []
    for span, words in uses:
        node, path, rest = parser, ["tropd"], list(words)
        while rest and rest[0] in _subcommands(node):
            node = _subcommands(node)[rest[0]]
            path.append(rest.pop(0))
        options = [re.sub(r"[\[\]]", "", w).split("=")[0] for w in rest if w.lstrip("[").startswith("--")]
        out.append((span, tuple(path), [o for o in options if re.fullmatch(r"--[a-z][a-z0-9-]*", o)]))
        if rest and _subcommands(node) and not rest[0].startswith(("-", "[")):
            out.append((span, (*path, rest[0]), []))  # an unknown subcommand: reported by the test
    return out


def _node(path: tuple[str, ...]) -> argparse.ArgumentParser | None:
    node = _parser()
    for name in path[1:]:
        node = _subcommands(node).get(name)
        if node is None:
            return None
    return node


def test_every_tropd_command_and_option_in_the_readme_exists():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    uses = _command_uses(text)
    assert len(uses) > 20, "the README's commands were not found: the parsing above is broken"
    problems = []
    for span, path, options in uses:
        node = _node(path)
        if node is None:
            problems.append(f"{' '.join(path)}: no such command (in `{span.strip()}`)")
            continue
        known = _options(node)
        problems += [f"{' '.join(path)} has no option {o} (in `{span.strip()}`)" for o in options if o not in known]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", ["README.md", "SECURITY.md"])
def test_every_option_named_in_prose_exists(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    known = set().union(*(_options(p) for _, p in _all_parsers(_parser())))
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", text))
    assert named, f"no option found in {doc}"
    unknown = sorted(named - known - FOREIGN_OPTIONS)
    assert not unknown, f"{doc} names options no tropd command has: {unknown}"


def _defaults_by_option() -> dict[str, list]:
    defaults: dict[str, list] = {}
    for _, parser in _all_parsers(_parser()):
        for action in parser._actions:
            for option in action.option_strings:
                defaults.setdefault(option, []).append(action.default)
    return defaults


@pytest.mark.parametrize("doc", ["README.md", "SECURITY.md"])
def test_option_defaults_given_in_the_documents_are_the_parsers(doc):
    """`--max-sequences` (1024 ...) in the README, `--max-sequences` 1024 in SECURITY's table: the number a
    document gives beside an option is that option's default."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    found = re.findall(r"`(--[a-z][a-z0-9-]+)`\s+\(?(\d[\d,]*(?:\.\d+)?)(?![\d.]*\s*(?:MiB|KiB|x))", text)
    assert found, f"no option with a default found in {doc}"
    defaults = _defaults_by_option()
    problems = []
    for option, number in found:
        value = float(number.replace(",", ""))
        if option not in defaults:
            continue  # the test above reports unknown options
        if not any(isinstance(d, (int, float)) and not isinstance(d, bool) and d == value for d in defaults[option]):
            problems.append(f"{doc}: {option} {number}, but its default is {sorted(map(str, defaults[option]))}")
    assert not problems, "\n".join(problems)


def _config_table_rows(text: str) -> list[tuple[str, str]]:
    """(key, default cell) of the README's table of config keys."""
    table = re.search(r"^\| key \| default \|[^\n]*\n((?:\|[^\n]*\n)+)", text, flags=re.M)
    rows = re.findall(r"^\| `([a-z_][a-z_.]*)` \| ([^|]*) \|", table.group(1) if table else "", flags=re.M)
    return [(key, default.strip()) for key, default in rows]


def test_every_config_key_in_the_readme_table_exists_with_its_default():
    from trainer.config import TrainConfig

    rows = _config_table_rows((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(rows) >= 10, "the README's config table was not found"
    defaults = TrainConfig().model_dump(mode="json")
    problems = []
    for key, cell in rows:
        node = defaults
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                problems.append(f"config key {key}: not in trainer/config.py")
                break
            node = node[part]
        else:
            literal = re.fullmatch(r"`([^`]*)`|(\d+)(?: \(.*\))?", cell)
            if literal is None:
                continue  # a default in words ("auto", "rollout's"): not checked
            given = yaml.safe_load(literal.group(1) if literal.group(1) is not None else literal.group(2))
            if given != node:
                problems.append(f"config key {key}: README's default {cell}, trainer/config.py's {node!r}")
    assert not problems, "\n".join(problems)


def test_the_toy_tropd_config_is_the_built_in_defaults():
    """`tropd demo` uses the built-in defaults, not configs/toy-tropd.yaml; its help and the file's comment say the
    file holds the same settings (all but `out`), which this keeps true."""
    from trainer.config import TrainConfig, load_config

    from_file = load_config(str(ROOT / "configs" / "toy-tropd.yaml")).model_dump(mode="json")
    built_in = TrainConfig().model_dump(mode="json")
    from_file.pop("out"), built_in.pop("out")
    assert from_file == built_in


def test_links_between_documents_resolve():
    problems = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if "://" not in target and not (doc.parent / target).exists():
                problems.append(f"{doc.relative_to(ROOT)} links to {target}, which does not exist")
    assert not problems, "\n".join(problems)


def test_no_citation_of_a_design_document_that_does_not_exist():
    """The design document is docs/design.md; nothing cites another one."""
    assert (ROOT / "docs" / "design.md").is_file()
    files = [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("configs/*.yaml")]
    for folder in ("tropd", "trainer", "services", "tests", "scripts", "deploy"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in {".py", ".md", ".yaml", ".sh"}]
    bad = [str(p.relative_to(ROOT)) for p in files if p.name != "test_docs.py" and "DESIGN" in p.read_text("utf-8")]
    assert not bad, f"these cite a DESIGN document that is not in the repository: {bad}"


def test_the_openapi_schema_states_no_sequence_limit_other_than_the_configured_one():
    from services.teacher import schemas
    from services.teacher.app import Settings

    sequences = schemas.ScoreRequest.model_json_schema()["properties"]["sequences"]
    assert sequences.get("maxItems", Settings().max_sequences) == Settings().max_sequences
    assert _defaults_by_option()["--max-sequences"] == [Settings().max_sequences]


def test_sequence_length_limits_are_the_ones_security_md_states():
    """SECURITY.md: a scored sequence of at most max_model_len - 1 tokens; a continuation's prefix plus max_tokens
    of at most max_model_len."""
    from services.teacher import schemas
    from services.teacher.app import Settings
    from services.teacher.inputs import BadInput, continue_items, score_items

    text = (ROOT / "SECURITY.md").read_text(encoding="utf-8")
    assert "at most `max_model_len - 1` tokens" in text and "of at most `max_model_len` tokens" in text
    info, settings = SimpleNamespace(vocab_size=10, max_model_len=8), Settings()
    assert len(score_items(schemas.ScoreRequest(sequences=[[1] * 7]), info, settings)) == 1
    with pytest.raises(BadInput, match="more than the limit of 7"):
        score_items(schemas.ScoreRequest(sequences=[[1] * 8]), info, settings)
    prefixes, _ = continue_items(schemas.ContinueRequest(prefixes=[[1] * 5], max_tokens=3), info, settings)
    assert prefixes == [[1] * 5]
    with pytest.raises(BadInput, match="exceeds max_model_len 8"):
        continue_items(schemas.ContinueRequest(prefixes=[[1] * 5], max_tokens=4), info, settings)


def test_toy_eval_seed_picks_the_prompts():
    """`tropd toy eval --seed` picks the eval prompts (its help says so): the same seed, the same prompts."""
    from trainer.toy import tasks

    a, b, c = (tasks.examples("math", "eval", 20, seed) for seed in (0, 0, 1))
    assert [e.prompt for e in a] == [e.prompt for e in b] != [e.prompt for e in c]
    seed_help = next(a for a in _node(("tropd", "toy", "eval"))._actions if "--seed" in a.option_strings).help
    assert "eval prompts" in seed_help


PATH_ROOTS = ("trainer", "services", "tropd", "tests", "scripts", "configs", "deploy", "docs", ".ci")
PATH_RE = re.compile(r"(?<![\w./-])((?:" + "|".join(re.escape(r) for r in PATH_ROOTS) + r")/[\w./-]*)(?![\w*])")
# named in the documents but made by the user, not in the tree: the key file a user writes from its example, and
# kubectl's `deploy/NAME` (a Deployment, not a folder)
NOT_IN_TREE = {"deploy/teacher.env", "deploy/tropd-teacher"}


def _project_paths(text: str) -> set[str]:
    """Paths of the project's tree named in the document: in code, in prose and in links."""
    found = set()
    for match in PATH_RE.finditer(text):
        path = match.group(1).rstrip(".,:")
        if "{" in path or path in NOT_IN_TREE:
            continue
        found.add(path.split("::", 1)[0])
    return found


def test_project_paths_in_the_documents_exist():
    missing = []
    for doc in DOCS:
        for path in sorted(_project_paths(doc.read_text())):
            if not (ROOT / path).exists():
                missing.append(f"{doc.relative_to(ROOT)}: {path}")
    assert missing == []


def test_path_check_sees_paths_in_prose_code_and_links():
    text = "see `trainer/losses.py`, [x](docs/design.md), trainer/toy/tasks/; not artifacts/x, a/tests/b, docs/c*.md"
    assert _project_paths(text) == {"trainer/losses.py", "docs/design.md", "trainer/toy/tasks/"}

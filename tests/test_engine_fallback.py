"""`--engine auto` serves with the hf engine, after one warning line, when vLLM is installed but cannot start;
`--engine vllm` then refuses in one line. A broken install is a `vllm` package whose import fails, first on the
path, as a vLLM wheel built for another CPU fails on this one."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.helpers import teacher

BROKEN = 'raise ImportError("this vllm build needs an instruction set this CPU lacks")\n'


@pytest.fixture
def broken_vllm(tmp_path):
    package = tmp_path / "broken" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(BROKEN)
    return {"PYTHONPATH": f"{package.parent}:{sys.path[0] or '.'}"}


def test_auto_falls_back_to_hf_with_one_warning_line(toy_quick, tmp_path, broken_vllm):
    with teacher(toy_quick / "teacher", "auto", tmp_path, "--threads", "1", env=broken_vllm) as service:
        info = httpx.get(f"{service.url}/v1/info", timeout=30).json()
        scored = httpx.post(f"{service.url}/v1/score", json={"sequences": [[1, 5, 6, 7]], "start": 1}, timeout=60)
        log = service.log_path.read_text()
    assert info["engine"] == "hf"
    assert scored.status_code == 200, scored.text
    warnings = [line for line in log.splitlines() if "vLLM cannot start" in line]
    assert len(warnings) == 1, log
    assert "instruction set this CPU lacks" in warnings[0] and "using the hf engine" in warnings[0]
    assert "Traceback" not in log


def test_explicit_vllm_engine_refuses_in_one_line(toy_quick, tmp_path, broken_vllm):
    command = [sys.executable, "-m", "tropd", "teacher", "serve", "--model", str(toy_quick / "teacher")]
    result = subprocess.run(
        [*command, "--engine", "vllm", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, **broken_vllm},
    )
    assert result.returncode == 2, result.stderr
    assert "vLLM cannot start here" in result.stderr and "--engine hf" in result.stderr
    assert "Traceback" not in result.stderr

"""The built wheel runs as the uvx one-liner a desktop host uses."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import anyio
import pytest

from tests.conftest import CHAT_MODEL, CHAT_TOOL, fake_process

ROOT = Path(__file__).resolve().parents[1]


def _uvx() -> str:
    found = Path(sys.executable).with_name("uvx")
    return str(found) if found.exists() else (shutil.which("uvx") or pytest.fail("uvx missing: pip install -e '.[test]'"))


@pytest.mark.anyio
async def test_uvx_runs_the_built_wheel(tmp_path: Path) -> None:
    build = await anyio.run_process(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(ROOT)], check=False
    )
    assert build.returncode == 0, build.stderr.decode()[-2000:]
    wheel = next(tmp_path.glob("llm_hub-*.whl"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_HUB_", "LMSTUDIO_", "VIRTUAL_ENV"))}
    async with fake_process("--models", CHAT_MODEL) as (_, url):
        result = await anyio.run_process(
            [_uvx(), "--from", str(wheel), "llm-hub", "check"],
            env={**env, "LMSTUDIO_URL": url}, check=False,
        )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()[-2000:]
    assert "LM Studio: OK" in out and CHAT_TOOL in out

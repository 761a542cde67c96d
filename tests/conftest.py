"""Fixtures several test files share."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Iterator, Optional

import pytest
import torch


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for the test: the machine's two cores are shared, and one thread
    keeps a file fast and its timings predictable. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def isolated_caches(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    """No kernel timing, and the autotune and int8 caches in the test's own folder."""
    monkeypatch.setenv("SWAT_AUTOTUNE", "0")
    monkeypatch.setenv("SWAT_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.setenv("SWAT_INT8_CACHE", str(tmp_path / "int8"))


# ------------------------------------------------------------------ running the `swat` command
# Plain functions (not fixtures) because module-scoped fixtures use them too; test files import
# them with ``from conftest import run_swat`` (pytest puts tests/ on sys.path).
def swat_env(**extra: str) -> dict[str, str]:
    """Environment for a `swat` subprocess: no display, kernels chosen by rule (no timing)."""
    return dict(os.environ, MPLBACKEND="Agg", SWAT_AUTOTUNE="0", **extra)


def run_swat(*args: str, env: Optional[dict[str, str]] = None, check: bool = False,
             cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """The `swat` command in its own process (``python -m cli``); ``check`` fails the test on a
    non-zero exit with both output streams."""
    proc = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          env=env or swat_env(), cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"swat {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def invoke_swat(*args: str) -> subprocess.CompletedProcess:
    """The real `swat` command in this process (Typer's runner): no Python start per call."""
    from typer.testing import CliRunner

    from cli.main import app  # importing cli.main registers every command

    r = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(list(args), r.exit_code, r.stdout, r.stderr)

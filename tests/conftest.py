"""Fixtures several test files share."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Iterator, Optional

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def no_timing_and_private_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test, and every `swat` process a test starts, picks kernels by rule instead of timing
    them (timings make a test slow and its path depend on the machine's load) and keeps its
    caches in a temp folder, never the user's ~/.cache. Tests of the timing itself set
    SWAT_AUTOTUNE=1 with monkeypatch."""
    mp = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("caches")
    mp.setenv("SWAT_AUTOTUNE", "0")
    mp.setenv("SWAT_AUTOTUNE_CACHE", str(folder / "autotune.json"))
    mp.setenv("SWAT_INT8_CACHE", str(folder / "int8"))
    yield
    mp.undo()


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
    """Environment for a `swat` subprocess: no display, kernels chosen by rule (no timing), torch
    on one thread unless ``extra`` says otherwise (two torch threads on a 2-core machine that is
    busy with anything else stall at every barrier: a 3-epoch LeNet-5 run took 3x longer)."""
    return dict(os.environ, **{"MPLBACKEND": "Agg", "SWAT_AUTOTUNE": "0", "OMP_NUM_THREADS": "1", **extra})


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

"""Fixtures several test files share."""
from __future__ import annotations

from typing import Iterator

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

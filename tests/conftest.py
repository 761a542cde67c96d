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

"""Model tests run with one intra-op thread: on a shared, loaded 2-core CPU, small ops otherwise wait
for worker threads."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared, loaded CPU, small ops otherwise wait for worker threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

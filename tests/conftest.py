"""Shared fixtures. Modules that train or evaluate tiny models use ``one_thread`` (via ``pytestmark``)."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Run on one torch thread, restoring the setting afterwards: tiny models run fastest on one thread,
    above all on a shared, busy 2-core CPU, where OpenMP threads wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

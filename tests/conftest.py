"""Shared fixtures. Modules that train or evaluate tiny models use ``one_thread`` (via ``pytestmark``)."""
import re
from pathlib import Path

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


@pytest.fixture
def teaching_recipe() -> dict:
    """The overrides scripts/make_teaching_models.sh adds to the smoke preset for each mode (its RECIPE, and SQR's
    extra setting), as {"uqr": [...], "sqr": [...]}, read from the script itself."""
    script = (Path(__file__).parents[1] / "scripts" / "make_teaching_models.sh").read_text()
    recipe = re.search(r'^RECIPE=\$\{RECIPE-"([^"]*)"\}', script, re.M).group(1).split()
    sqr_extra = re.search(r'then extra="([^"]*)"', script).group(1).split()
    return {"uqr": recipe, "sqr": recipe + sqr_extra}

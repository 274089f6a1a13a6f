import os

import pytest

from fixtures import World


@pytest.fixture(scope="session")
def world():
    w = World()
    yield w
    w.stop(keep=bool(os.environ.get("E2E_KEEP")))

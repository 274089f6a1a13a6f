import os

import pytest

from fixtures import World


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "incremental: the module's tests are ordered steps of one journey; after a failed step "
        "the later ones are reported as xfail instead of failing for the same reason")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and call.when in ("setup", "call") and item.get_closest_marker("incremental"):
        item.parent._failed_step = item.name
    return report


def pytest_runtest_setup(item):
    if item.get_closest_marker("incremental"):
        failed = getattr(item.parent, "_failed_step", None)
        if failed is not None:
            pytest.xfail(f"an earlier step failed: {failed}")


@pytest.fixture(scope="session")
def world():
    w = World()
    yield w
    w.stop(keep=bool(os.environ.get("E2E_KEEP")))

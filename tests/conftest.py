import os

import pytest
import torch

import background_jobs

# Keep Inductor's C++ compile cache between test runs (the FX graph cache is switched
# off per test where a test counts pass matches).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".inductor-cache"))


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: only the jobs of tests that run start
def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    # the long subprocess checks start now and run beside the tests; the tests that wait for them go last
    waiting = [item for item in items if item.get_closest_marker("background_job")]
    keys = {item.get_closest_marker("background_job").args[0] for item in waiting}
    if not config.option.collectonly:
        background_jobs.start(sorted(keys, key=list(background_jobs.JOBS).index))
    ids = {id(item) for item in waiting}
    items[:] = [item for item in items if id(item) not in ids] + waiting


def pytest_sessionfinish(session, exitstatus):
    background_jobs.stop()


@pytest.fixture(autouse=True)
def no_fast_linear_plans():
    """Each test starts without the eager fast path's recorded plans (ops/fast_linear.py): a plan left
    by an earlier test would replay CUDA kernels where a test steers the Python path elsewhere."""
    from fp4_compile.ops import fast_linear

    fast_linear.forget_plans()


@pytest.fixture
def seed():
    """A fresh seed per test run (printed on failure), never a fixed one."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    print(f"seed={value}")
    return value

import os

import pytest
import torch

# Keep Inductor's C++ compile cache between test runs (the FX graph cache is switched
# off per test where a test counts pass matches).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".inductor-cache"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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

"""torch.compile(model, backend="fp4") on randomly sized models (CPU): compiled equals eager exactly, and
every linear is fused.

``ExactGlue`` (compile_helpers) joins three NVFP4 linears (a dynamic activation scale with a bias, static
scales with and without one) by ops that Inductor computes bit-exactly. Here its sizes (K and N multiples
of 16, padded or not to the backend's 32), the batch shape (2-D or 3-D), the backend (the emulation, or a
padded one with swizzled or linear scales: ``pad_k`` and an output slice in every layer) and the inputs'
magnitude are drawn afresh each run; the seed is printed, ``FP4C_FUZZ_SEED=<seed>`` repeats a run.
"""

from __future__ import annotations

import random

import pytest
import torch
from compile_helpers import SWIZZLED, UNSWIZZLED, ExactGlue, patch_padded_backends
from fuzz_seed import fuzz_seed

from fp4_compile.passes import record_results

SEED = fuzz_seed()
CASES = 6
NO_FX_CACHE = {"fx_graph_cache": False}  # a cache hit would skip the pass (and its records)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("index", range(CASES))
def test_random_model_compiles_to_fused_linears_exactly(index, monkeypatch):
    rng = random.Random(SEED * 1000 + index)
    backend = ("emulation", SWIZZLED, UNSWIZZLED)[index % 3]
    if backend != "emulation":
        patch_padded_backends(monkeypatch)
    k, n = 16 * rng.randint(1, 24), 16 * rng.randint(1, 24)
    shape = (rng.randint(1, 3), rng.randint(1, 9), k) if rng.random() < 0.5 else (rng.randint(1, 70), k)
    scale = 10.0 ** rng.uniform(-3, 3)
    print(f"FP4C_FUZZ_SEED={SEED} case {index}: backend={backend} K={k} N={n} x{shape} * {scale:.3g}")
    torch.manual_seed(SEED * 1000 + index)
    model = ExactGlue(backend=backend, k=k, n=n)
    x = torch.randn(shape) * scale
    with torch.no_grad(), record_results() as results:
        out = torch.compile(model, backend="fp4", fullgraph=True, options=NO_FX_CACHE)(x)
        expected = model(x)
    assert torch.equal(out, expected), f"FP4C_FUZZ_SEED={SEED} case {index}"
    (graph,) = results
    assert len(graph.fused) == 3 and not graph.unfused, (graph.fused, graph.unfused)

"""What the Hopper kernels read through the read-only path.

Launched with programmatic dependent launch (ops/pdl.py), a kernel starts while the kernel before it still
runs; ``griddepcontrol.wait`` orders that kernel's writes before the loads after it, but the read-only path
(``ld.global.nc``, ``__ldg``) is only valid for data that no grid writes during the reader's life: the small-M
kernel's ``.nc`` loads of W4A4 activation codes returned stale values in CUDA graphs (groups at M = 9..16,
relative error 0.25-0.34; benchmarks/NOTES.md v25g). So the kernels read activations, their scales, global
scales and alpha with the coherent loads of grid_dependency.cuh, and ``.nc`` only the weights and their scales,
which no kernel of a forward writes. Checked on the sources (no GPU needed).
"""

from __future__ import annotations

import pathlib
import re

HOPPER = pathlib.Path(__file__).resolve().parent.parent / "fp4_compile" / "csrc" / "hopper"


def _code(path: pathlib.Path) -> str:
    """The source without its comments."""
    return re.sub(r"//[^\n]*", "", path.read_text())


def test_read_only_loads_are_for_weights_only():
    sources = sorted(HOPPER.glob("*.cu")) + sorted(HOPPER.glob("*.cuh"))
    assert any(p.name == "nvfp4_small_m.cu" for p in sources)
    for path in sources:
        code = _code(path)
        assert "__ldg" not in code, path.name
        nc = re.findall(r"ld\.global\.nc[\w:.]*", code)
        if path.name != "nvfp4_small_m.cu":
            assert not nc, (path.name, nc)
            continue
        # the two weight loaders (each as a plain and a volatile asm: the latter stays before the PDL wait,
        # where the kernel before is our quantization), and every call of them on the weight rows' pointers
        assert len(nc) == 2, nc
        assert len(re.findall(r"#define FP4C_WEIGHT_(?:CHUNK|SCALE)_LOAD \"ld\.global\.nc", code)) == 2
        helpers = re.findall(r"__device__ __forceinline__ \w+ (\w+)\(const void\* p\) \{\s*[^}]*FP4C_WEIGHT_\w+_LOAD",
                             code)
        assert sorted(helpers) == ["load_weight_chunk", "load_weight_scale_pair"], helpers
        calls = [arg for _, arg in re.findall(r"\b(load_weight_chunk|load_weight_scale_pair)(?:<\w+>)?\((\w+)", code)
                 if arg != "const"]  # (not the definitions)
        assert calls and all(arg in ("w_row", "s_row") for arg in calls), calls


def test_coherent_loads_stay_after_the_wait():
    """The coherent loads are volatile asm: the compiler keeps them after ``griddepcontrol.wait`` (also volatile)."""
    code = _code(HOPPER / "grid_dependency.cuh")
    loads = re.findall(r"asm(\s+volatile)?\(\"ld\.global[^\"]*\"", code)
    assert len(loads) == 4 and all(volatile for volatile in loads), loads
    assert 'asm volatile("griddepcontrol.wait' in code

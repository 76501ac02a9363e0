"""Shared by the tests of the nvcc-built CUDA parts (test_cuda_small_m.py, test_cuda_quant.py,
test_cublaslt.py; not a test module): the ``needs_nvcc`` mark, ptxas's per-kernel report of a
build (run here or as a background job), and the check that ``nvcc.build_shared_library`` caches its output."""

from __future__ import annotations

import pathlib
import re
import subprocess
from typing import NamedTuple

import pytest

import background_jobs
from fp4_compile.ops import nvcc

needs_nvcc = pytest.mark.skipif(nvcc.nvcc_path() is None, reason="nvcc not installed")


class PtxasReport(NamedTuple):
    kernels: list[str]              # entry functions compiled
    spills: list[tuple[str, str]]   # (spill store bytes, spill load bytes) per kernel
    registers: list[int]            # registers per kernel
    log: str                        # everything nvcc and ptxas printed


def compile_with_ptxas_report(cmd: list[str]) -> PtxasReport:
    """Run an nvcc command that passes ``-Xptxas -v``; fail on a build error."""
    return ptxas_report(subprocess.run(cmd, capture_output=True, text=True, timeout=600))


def ptxas_report(done: subprocess.CompletedProcess | background_jobs.Finished) -> PtxasReport:
    """What a finished ``-Xptxas -v`` build printed; fail on a build error."""
    assert done.returncode == 0, done.stderr[-3000:]
    info = done.stdout + done.stderr
    return PtxasReport(re.findall(r"Compiling entry function '(\w+)'", info),
                       re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info),
                       [int(r) for r in re.findall(r"Used (\d+) registers", info)], info)


def build_twice(source: pathlib.Path, flags: list[str], stem: str, build_dir: pathlib.Path) -> pathlib.Path:
    """Build ``source`` into ``build_dir`` (``$FP4C_BUILD_DIR`` must point there) twice: the second
    call returns the first library untouched, and no temporary files are left."""
    lib = nvcc.build_shared_library(source, flags, stem)
    assert lib.parent == build_dir and lib.exists()
    stamp = lib.stat().st_mtime_ns
    assert nvcc.build_shared_library(source, flags, stem) == lib
    assert lib.stat().st_mtime_ns == stamp
    assert [p.name for p in build_dir.iterdir()] == [lib.name]
    return lib

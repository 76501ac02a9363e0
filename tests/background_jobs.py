"""The suite's long subprocess checks (the nvcc and g++ compile checks, the Triton interpreter's worker),
started as soon as the suite is collected and run beside the tests, one per core; a test marked
``background_job(key)`` waits for its job's result (``result(key)``), and runs after the other tests.

Run one after another in the tests that check them they took about 4 of the suite's 6 minutes on CI's
2 cores, with the second core idle. Not a test module: ``conftest.py`` starts and stops the jobs."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from typing import NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


class Job(NamedTuple):
    cmd: list[str]
    output: pathlib.Path | None = None   # the file the command writes, if a test reads it afterwards
    env: dict[str, str] | None = None
    timeout: float = 600.0


class Finished(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    output: pathlib.Path | None


# key -> factory(directory) giving the job, or the reason why its tests are skipped on this machine; in the
# order the jobs start (the longest first)
JOBS: dict[str, Callable[[pathlib.Path], Job | str]] = {}


def job(key: str) -> Callable:
    def register(factory: Callable[[pathlib.Path], Job | str]) -> Callable[[pathlib.Path], Job | str]:
        JOBS[key] = factory
        return factory
    return register


def _cuda_macros_shim(directory: pathlib.Path) -> tuple[str, ...]:
    """An include directory with c10/cuda's generated macros header where this torch lacks it (a CPU build
    ships c10/cuda's headers without it; a CUDA build has it with exactly this content), else none."""
    from torch.utils.cpp_extension import include_paths

    header = pathlib.Path("c10", "cuda", "impl", "cuda_cmake_macros.h")
    if any((pathlib.Path(p) / header).is_file() for p in include_paths()):
        return ()
    shim = directory / "shim"
    (shim / header).parent.mkdir(parents=True)
    (shim / header).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return (str(shim),)


def _nvcc_missing() -> str | None:
    from fp4_compile.ops import nvcc

    return "nvcc not installed" if nvcc.nvcc_path() is None else None


@job("cutlass_sm100a")
def _cutlass(directory: pathlib.Path) -> Job | str:
    from fp4_compile.ops import blackwell as bw

    if bw.nvcc_path() is None:
        return "nvcc not found"
    if (bw.nvcc_version() or (0, 0)) < (12, 8):
        return f"nvcc {bw.nvcc_version()} cannot build sm_100a"
    if bw.cutlass_include_dirs() is None:
        return "CUTLASS headers not found (pip install nvidia-cutlass)"
    obj = directory / "nvfp4_gemm_sm100.o"
    return Job(bw.cutlass_compile_command(str(obj), "100a", _cuda_macros_shim(directory)), obj)


@job("wgmma_sm90a")
def _wgmma(directory: pathlib.Path) -> Job | str:
    from fp4_compile.ops import cuda_wgmma

    lib = directory / "wgmma.so"
    return _nvcc_missing() or Job(cuda_wgmma.compile_command(str(lib)), lib)


@job("triton_interpret")
def _triton_interpret(directory: pathlib.Path) -> Job | str:
    """Triton reads TRITON_INTERPRET when it is imported: the kernels run in a process of their own."""
    if importlib.util.find_spec("triton") is None:
        return "triton not installed"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return Job([sys.executable, str(ROOT / "tests" / "_triton_interp_worker.py")], env=env, timeout=300)


@job("small_m_sm90")
def _small_m(directory: pathlib.Path) -> Job | str:
    from fp4_compile.ops import cuda_small_m

    lib = directory / "small_m.so"
    return _nvcc_missing() or Job(cuda_small_m.compile_command(str(lib), (9, 0)), lib)


@job("quant_sm90")
def _quant(directory: pathlib.Path) -> Job | str:
    from fp4_compile.ops import cuda_quant

    lib = directory / "quant.so"
    return _nvcc_missing() or Job(cuda_quant.compile_command(str(lib), (9, 0)), lib)


@job("fast_linear_gxx")
def _fast_linear(directory: pathlib.Path) -> Job | str:
    """A syntax-and-types check of the C++ extension with g++ (the CPU wheel lacks c10_cuda's generated
    macros header and library, so this stops short of linking)."""
    from fp4_compile.ops import fast_linear
    from torch.utils import cpp_extension

    if shutil.which("g++") is None:
        return "g++ not installed"
    cuda_home = cpp_extension.CUDA_HOME or "/usr/local/cuda"
    if not pathlib.Path(cuda_home, "include", "cuda_runtime_api.h").exists():
        return "no CUDA runtime headers"
    includes = [f"-I{d}" for d in (*cpp_extension.include_paths(), f"{cuda_home}/include",
                                   *_cuda_macros_shim(directory))]
    return Job(["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Werror=return-type", *includes,
                str(fast_linear.SOURCE)], timeout=300)


class _Runner:
    """The jobs of one session: a pool of one thread per core, each waiting on its subprocess."""

    def __init__(self) -> None:
        self.directory = pathlib.Path(tempfile.mkdtemp(prefix="fp4c-background-jobs-"))
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, 4)))
        self.futures: dict[str, concurrent.futures.Future] = {}
        self.processes: list[subprocess.Popen] = []
        self.lock = threading.Lock()
        self.stopping = False

    def submit(self, key: str) -> None:
        if key not in self.futures:
            self.futures[key] = self.pool.submit(self._run, key)

    def _run(self, key: str) -> Finished | str:
        directory = self.directory / key
        directory.mkdir()
        spec = JOBS[key](directory)
        if isinstance(spec, str):
            return spec
        with self.lock:
            if self.stopping:
                return "the session ended before this job started"
            proc = subprocess.Popen(spec.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=spec.env, cwd=ROOT)
            self.processes.append(proc)
        try:
            out, err = proc.communicate(timeout=spec.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += f"\n(killed after {spec.timeout:.0f} s)"
        return Finished(proc.returncode, out, err, spec.output)

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            for proc in self.processes:
                if proc.poll() is None:
                    proc.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.directory, ignore_errors=True)


_runner: _Runner | None = None


def start(keys: Iterable[str]) -> None:
    """Start the jobs ``keys`` (in this order, as cores free up)."""
    global _runner
    for key in keys:
        if key not in JOBS:
            raise KeyError(f"no background job {key!r} (tests/background_jobs.py)")
        if _runner is None:
            _runner = _Runner()
        _runner.submit(key)


def result(key: str) -> Finished:
    """The job's result, once it has finished (started here if the session did not start it); skips the
    calling test where the job cannot run on this machine."""
    start([key])
    outcome = _runner.futures[key].result()
    if isinstance(outcome, str):
        pytest.skip(outcome)
    return outcome


def stop() -> None:
    """Kill what still runs (a session cut short), drop what has not started, remove the outputs."""
    global _runner
    if _runner is not None:
        _runner.stop()
        _runner = None

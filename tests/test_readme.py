"""The README's Python examples run as written (CPU, emulation backend), so the page a user starts from cannot
drift from the package: the 30-second example (its own asserts: the compiled model equals eager bit for bit),
the Hugging Face example (quantize, compile, save, load) after it, and the depyf recipe and `inspect_compiled` on
the first example's model."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest
import torch

import fp4_compile.backends

ROOT = pathlib.Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def block(first_line: str) -> str:
    """The README's Python block that starts with ``first_line``."""
    (found,) = [b for b in BLOCKS if b.startswith(first_line)]
    return found


def run(*sources: str) -> tuple[dict, str]:
    """Execute the blocks in one namespace, as a reader pasting them in order; (namespace, what they printed)."""
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), torch.no_grad():
        for source in sources:
            exec(compile(source, "README.md", "exec"), namespace)
    return namespace, printed.getvalue()


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    # the depyf recipe turns Inductor's FX graph cache off for the process: as it was after the test
    with torch._inductor.config.patch(fx_graph_cache=torch._inductor.config.fx_graph_cache):
        yield
    torch._dynamo.reset()


def test_thirty_second_example(fresh_dynamo):
    _, printed = run(block("import torch, fp4_compile"))
    assert printed.startswith("NVFP4Linear(in_features=256, out_features=512, bias=True, backend=emulation (W4A4)")


def test_hugging_face_example(fresh_dynamo, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)  # it saves "llama-nvfp4" in the working directory
    # load_nvfp4 loads onto CUDA where there is one, to the GPU backends (their kernels: the gpu tests); the
    # example's "the same outputs" is the CPU's claim, checked here on the CPU on any machine
    monkeypatch.setattr(fp4_compile.backends, "default_device", lambda: torch.device("cpu"))
    namespace, _ = run(block("import torch, fp4_compile"), block("from fp4_compile import quantize_transformers_model"))
    assert (tmp_path / "llama-nvfp4" / "config.json").is_file()
    quantized, loaded = namespace["compiled"]._orig_mod, namespace["model"]  # before the save; loaded back
    ids = namespace["calib"][0]["input_ids"]
    with torch.no_grad():
        want = quantized(input_ids=ids, use_cache=False).logits
        assert torch.equal(loaded(input_ids=ids, use_cache=False).logits, want)  # "the same outputs"
    # compiled in bf16 it is not bit-equal to eager: Inductor rounds the norms otherwise, and a rounding moves
    # some activation codes (test_generate.py: equal with emulate_precision_casts)
    got = namespace["logits"]
    assert got.shape == want.shape and torch.isfinite(got).all()


def test_depyf_recipe(fresh_dynamo, tmp_path, monkeypatch):
    pytest.importorskip("depyf")
    monkeypatch.chdir(tmp_path)
    run(block("import torch, fp4_compile"), block("import depyf, torch"))
    (after,) = (tmp_path / "depyf_out").glob("__compiled_fn_*AFTER_POST_GRAD*.py")
    assert after.read_text().count("torch.ops.fp4.linear.default(") == 2  # both linears fused


def test_inspect_compiled_example(fresh_dynamo, tmp_path, monkeypatch):
    pytest.importorskip("depyf")
    monkeypatch.chdir(tmp_path)
    _, printed = run(block("import torch, fp4_compile"), block("from fp4_compile.inspection import inspect_compiled"))
    assert "1 compiled graph(s): 2 linear(s) fused into fp4.linear, 0 left unfused" in printed, printed

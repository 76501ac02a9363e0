"""torch.compile(model, backend="fp4") end to end (CPU; one gpu-marked test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from compile_helpers import SWIZZLED, ExactGlue, patch_padded_backends, tiny_transformer
from torch._dynamo.utils import counters

from fp4_compile import NVFP4Linear
from fp4_compile.backends import Backend, BackendError
from fp4_compile.compile import BackendUnavailableError, fp4_backend, inductor_config_patches, register
from fp4_compile.passes import record_results

NO_FX_CACHE = {"fx_graph_cache": False}  # a cache hit would skip the pass (and its records)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_register_is_idempotent():
    register()
    register()
    assert "fp4" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("fp4") is fp4_backend


def test_mode_and_options_become_inductor_patches():
    patches = inductor_config_patches("max-autotune", {"coordinate_descent_tuning": False})
    assert patches["max_autotune"] and patches["triton.cudagraphs"] and not patches["coordinate_descent_tuning"]
    assert inductor_config_patches("reduce-overhead")["triton.cudagraphs"]
    assert set(inductor_config_patches()) == {"post_grad_custom_post_pass", "triton.enable_pdl"}
    assert inductor_config_patches()["triton.enable_pdl"]  # Inductor's kernels launch with PDL too
    assert not inductor_config_patches(options={"triton.enable_pdl": False})["triton.enable_pdl"]


def test_fp4c_pdl_0_leaves_inductor_alone(monkeypatch):
    monkeypatch.setenv("FP4C_PDL", "0")
    assert set(inductor_config_patches()) == {"post_grad_custom_post_pass"}


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_compiled_equals_eager_exactly(grad_mode):
    torch.manual_seed(0)
    model = ExactGlue()
    x = torch.randn(2, 7, 64)
    with grad_mode(), record_results() as results:
        out = torch.compile(model, backend="fp4", fullgraph=True, options=NO_FX_CACHE)(x)
        expected = model(x)
    assert torch.equal(out, expected)
    (graph,) = results
    assert [(i.module, i.backend, i.bias) for i in graph.fused] == [
        ("a", "emulation", True), ("b", "emulation", False), ("c", "emulation", True)
    ]
    assert not graph.unfused


def test_grad_mode_compiles_fused_and_only_running_the_backward_raises():
    """With grad on and an input (or any parameter) needing a gradient, AOT autograd traces the backward
    while compiling (README's Hugging Face example: embeddings and norms need gradients). The forward must
    compile, fused and exact, and only a backward that runs raise."""
    torch.manual_seed(0)
    model = ExactGlue()
    x = torch.randn(2, 7, 64, requires_grad=True)
    with record_results() as results:
        out = torch.compile(model, backend="fp4", fullgraph=True, options=NO_FX_CACHE)(x)
    expected = model(x)
    assert torch.equal(out, expected) and out.requires_grad
    assert sorted(i.module for graph in results for i in graph.fused) == ["a", "b", "c"]
    assert not any(graph.unfused for graph in results)
    for y in (out, expected):
        with pytest.raises(RuntimeError, match="fp4::.* has no backward"):
            y.sum().backward()


def test_grad_mode_fuses_linears_of_one_input():
    """q/k/v-like linears of one input with one static scale: in grad mode the joint graph's CSE merges their
    quantizations, which the pass splits again, so that all of them fuse (and group at a small constant M)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 64))
    heads = [torch.nn.Linear(64, n) for n in (64, 32, 32)]
    quantized = [NVFP4Linear.from_linear(h, input_global_scale=2.5) for h in heads]
    gs = quantized[0].input_global_scale
    for q in quantized[1:]:
        q.input_global_scale = gs

    def forward(x):
        h = model(x)
        return [q(h) for q in quantized]

    x = torch.randn(3, 64)
    with record_results() as results:
        outs = torch.compile(forward, backend="fp4", options=NO_FX_CACHE)(x)
    for out, expected in zip(outs, forward(x)):
        assert torch.equal(out, expected)
    assert sum(len(graph.fused) for graph in results) == 3 and not any(graph.unfused for graph in results)


def test_a_python_scalar_added_to_the_output_is_not_a_bias():
    """``lin(x) + 1.0`` (the add's operand a literal in the graph, not a node) compiles; the linear fuses and
    the add stays."""
    torch.manual_seed(0)
    lin = NVFP4Linear.from_linear(torch.nn.Linear(64, 32, bias=False), input_global_scale=2.0)
    x = torch.randn(5, 64)
    with torch.no_grad(), record_results() as results:
        out = torch.compile(lambda v: lin(v) + 1.0, backend="fp4", options=NO_FX_CACHE)(x)
        assert torch.equal(out, lin(x) + 1.0)
    (graph,) = results
    assert [i.bias for i in graph.fused] == [False] and not graph.unfused


def test_padded_swizzled_backend_compiles_exactly(monkeypatch):
    patch_padded_backends(monkeypatch)
    torch.manual_seed(1)
    model = ExactGlue(backend=SWIZZLED, k=48, n=80)  # pad_k and slice in every layer
    x = torch.randn(3, 5, 48)
    with torch.no_grad(), record_results() as results:
        out = torch.compile(model, backend="fp4", fullgraph=True, options=NO_FX_CACHE)(x)
        assert torch.equal(out, model(x))
    assert len(results[0].fused) == 3 and not results[0].unfused


def test_transformer_dynamic_seq_no_recompiles():
    """Attention + MLP, 4 NVFP4Linears (static and dynamic scales), seq marked dynamic."""
    model = tiny_transformer()
    compiled = torch.compile(model, backend="fp4", fullgraph=True, options=NO_FX_CACHE)
    reference = torch.compile(model, backend="inductor", fullgraph=True, options=NO_FX_CACHE)
    with torch.inference_mode():
        x = torch.randn(2, 8, 64)  # (an inference tensor, as the ones below: no recompile for that)
        torch._dynamo.mark_dynamic(x, 1)
        with record_results() as results:
            compiled(x)
        reference(x)
        frames = counters["stats"]["unique_graphs"]
        for seq in range(2, 20):
            xs = torch.randn(2, seq, 64)
            out = compiled(xs)
            # Same Inductor code for everything but the fused linears: bit-equal to the
            # unfused chain compiled by plain Inductor ...
            assert torch.equal(out, reference(xs)), seq
            # ... and close to eager (LayerNorm/softmax/GELU are compiled code, an ulp
            # off eager, which can move an activation across a rounding boundary of E2M1).
            torch.testing.assert_close(out, model(xs), rtol=0.1, atol=0.1)
    assert counters["stats"]["unique_graphs"] == frames  # no recompile per new seq length
    (graph,) = results
    assert sorted(i.module for i in graph.fused) == ["fc1", "fc2", "proj", "qkv"] and not graph.unfused


def test_dynamic_m_from_1_to_64_compiles_once():
    """dynamic=True: one graph for every M, M=1 included (backed_size_oblivious keeps
    Dynamo from specializing M=1)."""
    torch.manual_seed(2)
    model = ExactGlue()
    compiled = torch.compile(model, backend="fp4", fullgraph=True, dynamic=True, options=NO_FX_CACHE)
    with torch.no_grad(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
        for m in range(1, 65):
            x = torch.randn(m, 64)
            assert torch.equal(compiled(x), model(x)), m
    assert counters["stats"]["unique_graphs"] == 1


def test_unfusable_graph_compiles_and_runs():
    """The quantized activation has a second user: the chain stays as it is, and runs."""
    torch.manual_seed(3)
    layer = NVFP4Linear.from_linear(torch.nn.Linear(64, 32), input_global_scale=3.0)

    class PeekAtCodes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            a, s = torch.ops.fp4.quantize(x, layer.input_global_scale)
            out = torch.ops.fp4.mm(a, s, layer.weight, layer.weight_scale, layer.alpha, x.dtype, "emulation")
            return out + layer.bias, (a & 7).sum(dtype=torch.int64)

    model = PeekAtCodes()
    x = torch.randn(6, 64)
    with torch.no_grad(), record_results() as results:
        out, peek = torch.compile(model, backend="fp4", fullgraph=True, options=NO_FX_CACHE)(x)
        expected, expected_peek = model(x)
    assert torch.equal(out, expected) and torch.equal(peek, expected_peek)
    (graph,) = results
    assert not graph.fused and len(graph.unfused) == 1 and "another user" in graph.unfused[0].note


@pytest.mark.parametrize("backend", [Backend.CUTLASS, Backend.TRITON_W4A4])
def test_unavailable_backend_fails_at_compile_time(backend, monkeypatch):
    layer = NVFP4Linear.from_linear(torch.nn.Linear(64, 32))
    layer.backend = backend  # as if loaded for another machine; the CPU has neither
    calls = []
    monkeypatch.setattr("fp4_compile.ops.library.kernels_for", lambda b: calls.append(b))
    with pytest.raises(BackendError, match=f"'{backend.value}' is not available") as info:
        with torch.no_grad():
            torch.compile(layer, backend="fp4")(torch.randn(4, 64))
    assert isinstance(info.value, BackendUnavailableError)
    assert not calls  # failed before any kernel was looked up
    assert "layer.py" in str(info.value)  # points at the op's source line


def test_user_post_grad_pass_runs_after_ours():
    seen = []
    model = ExactGlue()
    options = {**NO_FX_CACHE, "post_grad_custom_post_pass": lambda g: seen.append(
        len(g.find_nodes(op="call_function", target=torch.ops.fp4.linear.default)))}
    with torch.no_grad():
        torch.compile(model, backend="fp4", options=options)(torch.randn(3, 64))
    assert seen == [3]


def test_depyf_dump_shows_fused_linear(tmp_path):
    from fp4_compile.inspection import inspect_compiled

    torch.manual_seed(4)
    model = ExactGlue()
    report = inspect_compiled(model, torch.randn(2, 3, 64), dump_dir=tmp_path / "dump")
    (graph,) = report.graphs
    assert report.fused == 3 and report.unfused == 0 and report.backends == {"emulation": 3}
    assert graph.post_grad_file and graph.post_grad_file.endswith(".py")
    text = open(graph.post_grad_file).read()
    assert text.count("torch.ops.fp4.linear.default(") == 3 == graph.linears_in_file
    assert "torch.ops.fp4.mm.default(" not in text and "torch.ops.fp4.quantize.default(" not in text
    forward_graph = [f for f in report.files if "Forward_graph" in f]
    assert forward_graph and "torch.ops.fp4.mm.default(" in (tmp_path / "dump" / forward_graph[0]).read_text()
    printed = report.format()
    assert "3 linear(s) fused" in printed and "emulation" in printed and "AFTER_POST_GRAD" in printed


def test_depyf_compat_makes_prepare_debug_load_modules(tmp_path):
    """torch 2.13 passes set_sys_modules= to PyCodeCache.load_by_key_path, which depyf
    0.20's hook does not take (Triton kernels are loaded that way on GPUs)."""
    import depyf
    from torch._inductor.codecache import PyCodeCache

    from fp4_compile.inspection import depyf_compat

    with depyf_compat(), depyf.prepare_debug(str(tmp_path)):
        module = PyCodeCache.load("VALUE = 41 + 1\n")
    assert module.VALUE == 42


# ---------------------------------------------------------------------------------------
# fresh interpreters: the entry point, and the FX graph cache across processes

CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    assert "fp4_compile" not in sys.modules
    compiler = torch._dynamo.lookup_backend("fp4")  # resolved through the entry point
    via_entry_point = "fp4_compile" in sys.modules and "fp4" in torch._dynamo.list_backends()

    from fp4_compile import NVFP4Linear
    from fp4_compile.compile import fp4_backend

    torch.manual_seed(0)
    layer = NVFP4Linear.from_linear(torch.nn.Linear(64, 32), input_global_scale=2.0)
    x = torch.randn(4, 64)
    codes = []
    for _ in range(int(sys.argv[1])):
        torch._dynamo.reset()
        with torch.no_grad():
            out, (code,) = run_and_get_code(torch.compile(layer, backend="fp4", fullgraph=True), x)
        assert torch.equal(out, layer(x))
        codes.append(code)
    print(json.dumps({
        "entry_point": via_entry_point and compiler is fp4_backend,
        "hits": counters["inductor"]["fxgraph_cache_hit"],
        "misses": counters["inductor"]["fxgraph_cache_miss"],
        "codes": codes,
    }))
    """
)


def _call_graph(code: str) -> list[str]:
    """The op calls of Inductor's output code (names of temporary files stripped)."""
    return [line.strip() for line in code.splitlines() if "torch.ops." in line and "#" not in line]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The child run twice with one fresh Inductor cache dir: compile twice, then once more."""
    cache = tmp_path_factory.mktemp("inductor-cache")
    script = cache / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    runs = []
    for count in (2, 1):
        proc = subprocess.run(
            [sys.executable, str(script), str(count)], capture_output=True, text=True, env=env, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return runs


def test_entry_point_resolves_in_fresh_interpreter(two_processes):
    assert two_processes[0]["entry_point"] and two_processes[1]["entry_point"]


def test_same_fused_graph_twice_and_from_warm_cache(two_processes):
    first, second = two_processes
    assert (first["misses"], first["hits"]) == (1, 1)  # compiled, then served by the cache
    assert (second["misses"], second["hits"]) == (0, 1)  # a new process: served by the cache
    graphs = [_call_graph(code) for code in first["codes"] + second["codes"]]
    assert graphs[0] == graphs[1] == graphs[2]
    assert any("torch.ops.fp4.linear.default(" in line for line in graphs[0])
    assert not any("fp4.quantize" in line or "fp4.mm" in line for line in graphs[0])


# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_reduce_overhead_cuda_graphs_default_backend():
    """CUDA graphs (mode="reduce-overhead") with the backend selected for the GPU
    (triton-w4a4 on Hopper): compiled == eager within rtol 1e-2, replays included."""
    from fp4_compile import select_backend

    torch.manual_seed(5)
    model = tiny_transformer().cuda()  # emulation weights; re-laid for the GPU's backend
    backend = select_backend(torch.device("cuda"))
    for module in model.modules():
        if isinstance(module, NVFP4Linear):
            module.set_backend(backend)
    compiled = torch.compile(model, backend="fp4", mode="reduce-overhead", fullgraph=True)
    with torch.inference_mode(), record_results() as results:
        for step in range(4):  # warm-up, record, replays
            x = torch.randn(4, 16, 64, device="cuda")
            out, expected = compiled(x), model(x)
            # relative to the whole output: an element whose activation rounds to another
            # E2M1 value (compiled LayerNorm is an ulp off eager) is allowed
            assert ((out - expected).norm() / expected.norm()).item() < 1e-2, step
    if results:  # absent if the FX graph cache served the graph
        assert all(info.backend == backend.value for info in results[0].fused + results[0].direct)

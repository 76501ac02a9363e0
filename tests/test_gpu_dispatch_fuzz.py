"""Random shapes through the fp4 ops on a CUDA GPU: every branch of the dispatch, element by element.

The other GPU tests choose shapes that reach each kernel path on purpose. This one draws (backend, M, N,
K, dtype, bias) afresh each run for ``fp4::linear``, ``linear_group``, ``linear_silu_mul``, ``quantize`` and
``mm`` (and ``rms_norm_quantize``, with a check of its own), biased toward the dispatch's edges (M = 8/9,
16/17, 64/65, ...; N and K off the kernels' multiples; the launch table's layer shapes, whose M between grid
points take the next point's pick), and checks every output element against the float64 product of the
quantized operands, within one rounding of the output type and what fp32 sums in any order can change
(exact_bounds.py), where a norm-relative tolerance, as the other tests use, lets a few wrong elements of a
large output through.

Each case runs three ways: the first eager call (the Python dispatch, which records the fast path's
plan), a second eager call on new activations (the C++ fast path's replay where it has a plan), and a
CUDA-graph replay on new activations. The run's seed is printed; ``FP4C_FUZZ_SEED=<seed>`` repeats it (the
draws and the data: each case has its own generator, so a failed capture cannot disturb the next cases).
``FP4C_FUZZ_SCALE=n`` draws n times as many cases (about 90 s of H100 time at 1, before the norm cases).
"""

from __future__ import annotations

import os
import random
from typing import NamedTuple

import pytest
import torch

import exact_bounds
from exact_bounds import SUM_ORDER
from fuzz_seed import fuzz_seed
from fp4_compile import format as F

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - collection on CPU machines
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from fp4_compile.backends import kernels_for  # noqa: E402
from fp4_compile.ops import tuned_wgmma_h100  # noqa: E402

# FP4C_FUZZ_DEVICE=cuda:1: the ops on a device that is not the current one (the eager calls; a capture runs
# on its device, made current for it)
DEV = os.environ.get("FP4C_FUZZ_DEVICE", "cuda")
SCALE = int(os.environ.get("FP4C_FUZZ_SCALE", "1"))  # a longer hunt: FP4C_FUZZ_SCALE=4 draws 4x the cases
CASES = 32 * SCALE
GROUP_CASES = 12 * SCALE
SEED = fuzz_seed()
# M by bands (decode, mid, large: the small-M kernel, the wgmma kernel and its table, the large-M paths),
# at the dispatch's edges or anywhere in the band
M_BANDS = ((0.4, (1, 16), (1, 2, 3, 5, 7, 8, 9, 12, 15, 16)),
           (0.35, (17, 512), (17, 24, 31, 32, 33, 48, 63, 64, 65, 96, 127, 128, 129, 192, 255, 256, 257, 384, 511,
                              512)),
           (0.25, (513, 2049), (513, 767, 1000, 1024, 1025, 1536, 2048, 2049)))
MAX_WEIGHT_ELEMENTS = 1 << 27   # the float64 reference's weight: 1 GB
MAX_PRODUCT = 1 << 35            # M * N * K of one float64 matmul
TABLE_SHAPES = sorted(s for s in tuned_wgmma_h100.PICKS if s[0] * s[1] <= MAX_WEIGHT_ELEMENTS)


class Case(NamedTuple):
    backend: str
    m: int
    n: int
    k: int
    dtype: torch.dtype
    bias: bool


def draw_case(index: int) -> Case:
    """Case ``index`` of this run: the backend and dtype by turns (every pair in six cases), the rest drawn."""
    rng = random.Random(SEED * 1000 + index)
    backend = ("triton-w4a4", "marlin")[index % 2]
    dtype = (torch.bfloat16, torch.float16, torch.float32)[index // 2 % 3]
    shape = rng.random()
    if shape < 0.35:
        n, k = rng.choice(TABLE_SHAPES)
    elif shape < 0.7:  # the kernels' multiples
        n, k = 16 * rng.randint(1, 512), 256 * rng.randint(1, 56)
    else:  # off them: N any, K a multiple of 16
        n, k = rng.randint(1, 3000), 16 * rng.randint(1, 400)
    _, (low, high), edges = rng.choices(M_BANDS, weights=[band[0] for band in M_BANDS])[0]
    m = rng.choice(edges) if rng.random() < 0.6 else rng.randint(low, high)
    m = max(1, min(m, MAX_PRODUCT // (n * k)))
    return Case(backend, m, n, k, dtype, rng.random() < 0.5)


class Layer(NamedTuple):
    args: tuple                 # fp4::linear's arguments after x
    weight_values: torch.Tensor  # float64 [n, k]
    gx: torch.Tensor
    alpha: torch.Tensor


def make_layer(case: Case, gen: torch.Generator, gx: torch.Tensor | None = None) -> Layer:
    """A prepared random layer of ``case`` and its operands; ``gx`` W4A4's activation global scale (default:
    from a first draw of x; later draws may exceed it, which clamps block scales)."""
    w = torch.randn(case.n, case.k, device=DEV, generator=gen)
    gw = F.global_scale_from_amax(w.abs().amax()).reshape(1)
    pw, sw = F.quantize_nvfp4(w, gw)
    weight, weight_scale = kernels_for(case.backend).prepare_weight(pw, sw)
    bias = torch.randn(case.n, device=DEV, generator=gen).to(case.dtype) if case.bias else None
    if gx is None:
        gx = F.global_scale_from_amax(fresh_x(case, gen).float().abs().amax()).reshape(1)
    if case.backend == "marlin":
        scale, alpha = gw, (1 / gw).float()
    else:
        scale, alpha = gx, (1 / (gx * gw)).float()
    return Layer((weight, weight_scale, scale, alpha, bias, case.n, case.backend),
                 F.block_values(pw, sw).double(), gx, alpha)


def reference(case: Case, layer: Layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the float64 product of the operands the backend multiplies, plus bias; the same of their absolute
    values, which bounds what the fp32 sums' order can change)."""
    if case.backend == "marlin":  # W4A16: the activations in the MMA's type (fp32 inputs as bf16)
        xv = (x.bfloat16() if x.dtype == torch.float32 else x).double()
    else:
        xv = F.block_values(*F.quantize_nvfp4(x, layer.gx)).double()
    return product(xv, layer)


def product(xv: torch.Tensor, layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference`` from the activation values the backend multiplies (float64)."""
    return exact_bounds.product_and_size(xv, layer.weight_values, layer.alpha, layer.args[4])


def assert_within(out: torch.Tensor, ref: torch.Tensor, size: torch.Tensor, shape: tuple, dtype: torch.dtype,
                  where: str) -> None:
    """``out`` of ``shape`` and ``dtype``, every element within exact_bounds' bound of ``ref``."""
    where = f"{where}, FP4C_FUZZ_SEED={SEED}"
    assert tuple(out.shape) == shape and out.dtype == dtype, (where, tuple(out.shape), out.dtype)
    bad = exact_bounds.outside(out, ref, size)
    if bad.any():
        pytest.fail(f"{where}: {exact_bounds.describe(out, ref, bad)}")


def check_linear(case: Case, layer: Layer, x: torch.Tensor, out: torch.Tensor, how: str) -> None:
    """``out`` against the float64 reference, element by element."""
    ref, size = reference(case, layer, x)
    assert_within(out, ref, size, (case.m, case.n), case.dtype, f"{case} ({how})")


def fresh_x(case: Case, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(case.m, case.k, device=DEV, generator=gen).to(case.dtype)


def generator(index: int) -> torch.Generator:
    gen = torch.Generator(device=DEV)
    gen.manual_seed(SEED * 1000 + index)
    return gen


def eager_and_graph(call, fresh, check) -> None:
    """``check(*inputs, call(*inputs), how)`` for the first eager call, a later one and a CUDA-graph replay,
    each on new inputs: ``fresh()`` draws them (a tuple of tensors, None for an absent one)."""
    for how in ("first eager call", "later eager call"):
        inputs = fresh()
        check(*inputs, call(*inputs), how)
    static = fresh()
    with torch.cuda.device(static[0].device):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = call(*static)
        for place, new in zip(static, fresh()):
            if place is not None:
                place.copy_(new)
        graph.replay()
    check(*static, static_out, "CUDA-graph replay")


@pytest.mark.parametrize("index", range(CASES))
def test_random_linear(index):
    case = draw_case(index)
    print(f"FP4C_FUZZ_SEED={SEED} case {index}: {case}")
    gen = generator(index)
    layer = make_layer(case, gen)
    eager_and_graph(lambda x: torch.ops.fp4.linear(x, *layer.args), lambda: (fresh_x(case, gen),),
                    lambda x, out, how: check_linear(case, layer, x, out, how))


def draw_group(index: int) -> list[Case]:
    """2 to 4 linears of one activation (``fp4::linear_group``) at decode sizes mostly: their N drawn
    apart, the rest of the first member's draw (fp32 activations as bf16: the grouped launch's types)."""
    first = draw_case(CASES + index)
    rng = random.Random(SEED * 1000 + CASES + index)
    m = rng.randint(1, 16) if rng.random() < 0.75 else rng.randint(17, 128)
    dtype = torch.bfloat16 if first.dtype == torch.float32 else first.dtype
    ns = [min(rng.choice((16 * rng.randint(1, 512), rng.randint(1, 3000))), MAX_WEIGHT_ELEMENTS // first.k)
          for _ in range(rng.randint(2, 4))]
    return [first._replace(m=m, n=n, dtype=dtype, bias=rng.random() < 0.5) for n in ns]


def _layers(cases: list[Case], gen: torch.Generator, shared_scale: bool) -> list[Layer]:
    """Prepared layers of ``cases`` (W4A4: one activation global scale tensor for all where ``shared_scale``,
    as a layer's q/k/v share theirs, else one each)."""
    gx = F.global_scale_from_amax(fresh_x(cases[0], gen).float().abs().amax()).reshape(1)
    return [make_layer(case, gen, gx if shared_scale else None) for case in cases]


def _op_lists(layers: list[Layer]) -> tuple:
    """The list arguments of the group ops (weights, scales, global scales, alphas, biases)."""
    return tuple(list(column) for column in zip(*(layer.args[:5] for layer in layers)))



@pytest.mark.parametrize("index", range(GROUP_CASES))
def test_random_linear_group(index):
    cases = draw_group(index)
    shared = index % 4 != 3
    print(f"FP4C_FUZZ_SEED={SEED} group {index} (shared scale: {shared}): {cases}")
    gen = generator(CASES + index)
    layers = _layers(cases, gen, shared)
    lists = _op_lists(layers)
    backend, ns = cases[0].backend, [case.n for case in cases]

    def check(x, outs, how):
        assert len(outs) == len(cases)
        for member, (case, layer, out) in enumerate(zip(cases, layers, outs)):
            check_linear(case, layer, x, out, f"{how}, member {member}")

    eager_and_graph(lambda x: torch.ops.fp4.linear_group(x, *lists, ns, backend), lambda: (fresh_x(cases[0], gen),),
                    check)


SILU_ARGMIN = -1.2784645  # where x * sigmoid(x) is least


def unfused_silu_mul(gate: torch.Tensor, up: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the graph ``F.silu(linear(x, gate)) * linear(x, up)`` computes from the two linears' exact
    results: each rounded to ``dtype``, then torch's SiLU and product (fp32 math, each result rounded)."""
    return torch.nn.functional.silu(gate.to(dtype)) * up.to(dtype)


@pytest.mark.parametrize("index", range(GROUP_CASES))
def test_random_linear_silu_mul(index):
    """``fp4::linear_silu_mul`` (the gated launch, or the group and a silu_mul kernel after it) computes what
    the unfused graph does (``unfused_silu_mul``), bit for bit, except where the fp32 sums' order may round
    the gate or up the other way: there it lies between the results of the two roundings."""
    gate_case = draw_group(index)[0]
    case = gate_case._replace(bias=False)
    gen = generator(CASES + GROUP_CASES + index)
    layers = _layers([gate_case, case], gen, shared_scale=True)
    lists = _op_lists(layers)
    print(f"FP4C_FUZZ_SEED={SEED} silu_mul {index}: {gate_case}")

    def check(x, out, how):
        (g, g_size), (v, v_size) = (reference(c, layer, x) for c, layer in zip((gate_case, case), layers))
        dt, where = case.dtype, f"{gate_case} ({how}), FP4C_FUZZ_SEED={SEED}"
        assert tuple(out.shape) == (case.m, case.n) and out.dtype == dt, where
        # the gate and up values that the sums' order allows: the ends of both intervals, and for the gate also
        # the point nearest the SiLU's minimum (it is not monotonic there); the products' extremes are among these
        g_low, g_high = g - SUM_ORDER * g_size, g + SUM_ORDER * g_size
        g_ends = (g_low, g_high, torch.minimum(torch.maximum(torch.full_like(g, SILU_ARGMIN), g_low), g_high))
        v_ends = (v - SUM_ORDER * v_size, v + SUM_ORDER * v_size)
        corners = torch.stack([unfused_silu_mul(ge, ve, dt).double() for ge in g_ends for ve in v_ends])
        low, high = corners.min(0).values, corners.max(0).values
        exact = (g_low.to(dt) == g_high.to(dt)) & (v_ends[0].to(dt) == v_ends[1].to(dt))
        o = out.double()
        bad = torch.where(exact, o != unfused_silu_mul(g, v, dt).double(), (o < low) | (o > high))
        if bad.any():
            i, j = (int(t) for t in bad.nonzero()[0])
            pytest.fail(f"{where}: {int(bad.sum())} of {out.numel()} elements off, e.g. [{i}, {j}] = {float(o[i, j])}"
                        f" against {float(unfused_silu_mul(g, v, dt)[i, j])} (range {float(low[i, j])}.."
                        f"{float(high[i, j])})")

    eager_and_graph(lambda x: torch.ops.fp4.linear_silu_mul(x, *lists, case.n, case.backend),
                    lambda: (fresh_x(case, gen),), check)


QUANT_CASES = 12 * SCALE


@pytest.mark.parametrize("index", range(QUANT_CASES))
def test_random_quantize(index):
    """``fp4::quantize`` at random shapes and magnitudes: the scale bytes (swizzled padding included) equal
    format.py's, the codes too but at exact rounding ties (one step, rarely)."""
    rng = random.Random(SEED * 1000 + 2 * CASES + index)
    m = rng.choice((1, 2, 3, 8, 9, 16, 17, 127, 128, 129, 1000, 1024, 1025, 4097))
    k = 16 * rng.randint(1, 700)
    dtype, swizzle = (torch.bfloat16, torch.float16, torch.float32)[index % 3], index % 2 == 1
    gen = generator(2 * CASES + index)
    magnitudes = torch.logspace(-3, 3, k, device=DEV)[torch.randperm(k, device=DEV, generator=gen)]
    x = (torch.randn(m, k, device=DEV, generator=gen) * magnitudes).to(dtype)
    gs = F.global_scale_from_amax(x.float().abs().amax()).reshape(1)
    where = f"M={m} K={k} {dtype} swizzle={swizzle}, FP4C_FUZZ_SEED={SEED}"
    print(where)
    q, sc = torch.ops.fp4.quantize(x, gs, swizzle)
    q_ref, sc_ref = F.quantize_nvfp4(x, gs, swizzle=swizzle)
    assert sc.dtype == torch.float8_e4m3fn and torch.equal(sc.view(torch.uint8), sc_ref.view(torch.uint8)), where
    codes, codes_ref = F.unpack_e2m1(q).long(), F.unpack_e2m1(q_ref).long()
    off = codes != codes_ref
    assert int(off.sum()) <= max(1, m * k // 100000), (where, int(off.sum()))
    assert not off.any() or int(((codes & 7) - (codes_ref & 7)).abs()[off].max()) <= 1, where


@pytest.mark.parametrize("index", range(QUANT_CASES))
def test_random_mm(index):
    """``fp4::mm`` (the W4A4 GEMM on quantized operands, after ``fp4::quantize``): the float64 product of the
    operands' block values, element by element; the weight's padding columns zero. Eager and captured."""
    case = draw_case(2 * CASES + QUANT_CASES + index)._replace(backend="triton-w4a4", bias=False)
    gen = generator(2 * CASES + QUANT_CASES + index)
    layer = make_layer(case, gen)
    weight, weight_scale, _, alpha, *_ = layer.args
    print(f"FP4C_FUZZ_SEED={SEED} mm {index}: {case}")

    def call(x):
        q, sc = torch.ops.fp4.quantize(x, layer.gx)
        return q, sc, torch.ops.fp4.mm(q, sc, weight, weight_scale, alpha, case.dtype, case.backend)

    def check(x, outs, how):
        q, sc, out = outs
        ref, size = product(F.block_values(q, sc).double(), layer)
        where = f"{case} ({how})"
        assert out.shape == (case.m, weight.shape[0]), (where, tuple(out.shape))
        assert not out[:, case.n:].any(), f"{where}: the padding columns are not zero"
        assert_within(out[:, :case.n], ref, size, (case.m, case.n), case.dtype, where)

    eager_and_graph(call, lambda: (fresh_x(case, gen),), check)


NORM_CASES = 12 * SCALE
NORM_ULPS = 8  # how far the kernels' float32 factor rsqrt(mean(s^2) + eps) may lie from torch's (sum order, rsqrt)


def norm_values(s: torch.Tensor, factor: torch.Tensor, weight: torch.Tensor, gs: torch.Tensor,
                unit_offset: bool) -> torch.Tensor:
    """The op's values from the float32 rows ``s`` and a float32 factor per row: ``(s * factor).to(dtype) * weight``
    (``unit_offset``: ``(s * factor * (1 + weight)).to(dtype)``), then the exact NVFP4 block values, in weight's dtype
    (``fp4::rms_norm_quantize``'s roundings)."""
    h = ((s * factor * (1 + weight.float())).to(weight.dtype) if unit_offset
         else (s * factor).to(weight.dtype) * weight)
    return F.block_values(*F.quantize_nvfp4(h, gs)).to(weight.dtype)


def factors_near(factor: torch.Tensor):
    """``factor``, then the float32 values 1, -1, 2, -2, ... NORM_ULPS steps from it."""
    yield factor
    up = down = factor
    for _ in range(NORM_ULPS):
        up, down = torch.nextafter(up, up + 1), torch.nextafter(down, down - 1)
        yield up
        yield down


@pytest.mark.parametrize("index", range(NORM_CASES))
def test_random_rms_norm_quantize(index):
    """``fp4::rms_norm_quantize`` (Llama's norm and Gemma's) at random shapes, magnitudes, residuals and global
    scales, eager (the CUDA kernel, then the fast path's replay) and captured (the Triton kernel): the residual sum
    equals ``x + residual``, and each row of values equals the op's roundings for one float32 factor within
    NORM_ULPS steps of torch's (the kernels sum the squares in another order): every element is checked, and none
    may differ on its own."""
    rng = random.Random(SEED * 1000 + 3 * CASES + index)
    m = rng.choice((1, 2, 3, 8, 16, 17, 64, 127, 512, 1025, rng.randint(1, 2049)))
    k = rng.choice((4096, 14336, 5120, 16 * rng.randint(1, 1300)))
    dtype = (torch.bfloat16, torch.float16, torch.float32)[index % 3]
    residual, eps = index % 2 == 0, rng.choice((1e-6, 1e-5))
    unit_offset = (index // 2) % 2 == 1  # with index % 2 and % 3: every dtype, residual and norm combination
    gen = generator(3 * CASES + index)
    # per-column magnitudes over four decades (activations' outlier channels)
    magnitudes = torch.logspace(-2, 2, k, device=DEV)[torch.randperm(k, device=DEV, generator=gen)]
    weight = ((0 if unit_offset else 1) + torch.randn(k, device=DEV, generator=gen) / 4).to(dtype)
    # a calibrated scale that some rows exceed (their block scales clamp)
    gs = F.global_scale_from_amax(4 * rng.uniform(0.25, 2)).reshape(1).to(DEV)
    where = f"M={m} K={k} {dtype} residual={residual} eps={eps} unit_offset={unit_offset}, FP4C_FUZZ_SEED={SEED}"
    print(where)

    def fresh() -> tuple[torch.Tensor, torch.Tensor | None]:
        x, r = ((torch.randn(m, k, device=DEV, generator=gen) * magnitudes).to(dtype) for _ in range(2))
        return x, (r if residual else None)

    def call(x, r):
        return torch.ops.fp4.rms_norm_quantize(x, r, weight, eps, gs, unit_offset)

    def check(x, r, outs, how):
        values, total = outs
        assert values.shape == x.shape and values.dtype == dtype, (where, how)
        s = x + r if residual else x
        if residual:
            assert torch.equal(total, s), f"{where} ({how}): the residual sum"
        sf = s.float()
        factor = torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)
        matched = torch.zeros(m, dtype=torch.bool, device=DEV)
        for f in factors_near(factor):
            matched |= (values == norm_values(sf, f, weight, gs, unit_offset)).all(-1)
            if matched.all():
                return
        i = int((~matched).nonzero()[0])
        near = norm_values(sf, factor, weight, gs, unit_offset)[i]
        j = int((values[i] != near).nonzero()[0])
        pytest.fail(f"{where} ({how}): {int((~matched).sum())} of {m} rows match no factor within {NORM_ULPS} "
                    f"float32 steps, e.g. row {i}: [{j}] = {float(values[i, j])} against {float(near[j])}")

    eager_and_graph(call, fresh, check)

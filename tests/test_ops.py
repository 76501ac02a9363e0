"""The fp4 torch.library ops: opcheck (schema, fake kernels, autograd registration) and results."""

import pytest
import torch

import fp4_compile  # noqa: F401  (registers torch.ops.fp4)
from fp4_compile import format as fmt


def _operands(m, n, k, dtype=torch.bfloat16):
    x = torch.randn(m, k, dtype=dtype)
    w = torch.randn(n, k)
    gs_w = fmt.global_scale_from_amax(w.abs().amax()).reshape(1)
    gs_x = fmt.global_scale_from_amax(x.abs().amax().float()).reshape(1)
    wq, ws = fmt.quantize_nvfp4(w, gs_w)
    alpha = torch.reciprocal(gs_x * gs_w)
    return x, wq, ws, gs_x, gs_w, alpha


@pytest.mark.parametrize("swizzle", [False, True])
def test_opcheck_quantize(seed, swizzle):
    x = torch.randn(5, 64, dtype=torch.float16)
    torch.library.opcheck(torch.ops.fp4.quantize.default, (x, torch.tensor([3.0]), swizzle))


def test_opcheck_pad_k(seed):
    a = torch.randint(0, 255, (3, 24), dtype=torch.uint8)
    torch.library.opcheck(torch.ops.fp4.pad_k.default, (a, 64))
    torch.library.opcheck(torch.ops.fp4.pad_k.default, (a, 48))


# opcheck's test_schema compares inputs with allclose, which torch lacks for float8 on the
# CPU; these ops take float8 scales, so that one check is replaced by an explicit one.
_UTILS_NO_SCHEMA = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _check_no_mutation(op, args):
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    op(*args)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                               b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)


def test_opcheck_mm(seed):
    x, wq, ws, gs_x, _, alpha = _operands(7, 24, 64)
    a, sa = torch.ops.fp4.quantize(x, gs_x)
    args = (a, sa, wq, ws, alpha, torch.bfloat16, "emulation")
    torch.library.opcheck(torch.ops.fp4.mm.default, args, test_utils=_UTILS_NO_SCHEMA)
    _check_no_mutation(torch.ops.fp4.mm.default, args)


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_linear(seed, with_bias):
    x, wq, ws, gs_x, _, alpha = _operands(6, 40, 48)
    bias = torch.randn(40, dtype=torch.bfloat16) if with_bias else None
    args = (x, wq, ws, gs_x, alpha, bias, 40, "emulation")
    torch.library.opcheck(torch.ops.fp4.linear.default, args, test_utils=_UTILS_NO_SCHEMA)
    _check_no_mutation(torch.ops.fp4.linear.default, args)


def test_quantize_op_equals_reference(seed):
    x = torch.randn(9, 80, dtype=torch.bfloat16)
    gs = fmt.global_scale_from_amax(x.abs().amax().float()).reshape(1)
    for swizzle in (False, True):
        got = torch.ops.fp4.quantize(x, gs, swizzle)
        want = fmt.quantize_nvfp4(x, gs, swizzle=swizzle)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1].view(torch.uint8), want[1].view(torch.uint8))


def test_mm_and_linear_equal_float64_reference(seed):
    x, wq, ws, gs_x, gs_w, alpha = _operands(11, 40, 96, dtype=torch.float32)
    bias = torch.randn(40)
    a, sa = fmt.quantize_nvfp4(x, gs_x)
    ref = (fmt.dequantize_nvfp4(a, sa, gs_x).double() @ fmt.dequantize_nvfp4(wq, ws, gs_w).double().t()) + bias.double()
    out = torch.ops.fp4.linear(x, wq, ws, gs_x, alpha, bias, 40, "emulation")
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-6
    mm = torch.ops.fp4.mm(a, sa, wq, ws, alpha, torch.float32, "emulation")
    assert torch.equal(mm + bias, out)


def test_emulation_is_exact_under_a_callers_autocast(seed):
    """An fp32 model run under ``torch.autocast(bfloat16)``: the ops are not autocast (their dtypes are the
    caller's), and the emulation's float32 matmul must not be either (it ran in bf16: 2e-3 off)."""
    x, wq, ws, gs_x, _, alpha = _operands(30, 100, 256, dtype=torch.float32)
    plain = torch.ops.fp4.linear(x, wq, ws, gs_x, alpha, None, 100, "emulation")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = torch.ops.fp4.linear(x, wq, ws, gs_x, alpha, None, 100, "emulation")
    assert autocast.dtype == torch.float32 and torch.equal(autocast, plain)


def test_backward_raises_with_a_clear_error(seed):
    x, wq, ws, gs_x, _, alpha = _operands(4, 32, 64, dtype=torch.float32)
    x.requires_grad_(True)
    out = torch.ops.fp4.linear(x, wq, ws, gs_x, alpha, None, 32, "emulation")
    assert out.requires_grad  # the forward runs; only the backward is missing
    with pytest.raises(RuntimeError, match="fp4::linear has no backward"):
        out.sum().backward()
    with torch.no_grad():
        assert not torch.ops.fp4.linear(x, wq, ws, gs_x, alpha, None, 32, "emulation").requires_grad


def test_a_bias_of_another_dtype_fails_to_compile_not_silently():
    """The fake kernel promises x's dtype: a bias of another dtype (whose sum would promote) is refused while
    compiling, not computed in a dtype the compiled graph does not expect."""
    x, wq, ws, gs_x, _, alpha = _operands(4, 32, 64, dtype=torch.bfloat16)
    bias = torch.randn(32)  # float32
    with pytest.raises(Exception, match="bias must have x's dtype"):
        torch.compile(lambda v: torch.ops.fp4.linear(v, wq, ws, gs_x, alpha, bias, 32, "emulation") * 2,
                      backend="fp4")(x)


def test_fake_kernels_symbolic_m():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        x = mode.from_tensor(torch.empty(300, 64, dtype=torch.bfloat16), symbolic_context=None)
        torch._dynamo.mark_dynamic(x, 0)
        q, s = torch.ops.fp4.quantize(x, torch.empty(1), True)
        assert q.shape[1] == 32 and s.shape == (384, 4)
        out = torch.ops.fp4.linear(x, torch.empty(24, 32, dtype=torch.uint8), torch.empty(24, 4, dtype=torch.float8_e4m3fn),
                                   torch.empty(1), torch.empty(1), None, 20, "emulation")
        assert out.shape == (300, 20) and out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "call,err,match",
    [
        (lambda: torch.ops.fp4.quantize(torch.randn(2, 3, 32), torch.ones(1)), ValueError, "2-D"),
        (lambda: torch.ops.fp4.quantize(torch.randn(2, 40), torch.ones(1)), ValueError, "multiple of 16"),
        (lambda: torch.ops.fp4.quantize(torch.ones(2, 32, dtype=torch.int32), torch.ones(1)), TypeError, "float32"),
        (lambda: torch.ops.fp4.quantize(torch.randn(2, 32), torch.ones(1, dtype=torch.float16)), TypeError, "float32"),
        (lambda: torch.ops.fp4.mm(torch.randn(2, 16), torch.ones(2, 2), torch.zeros(4, 16, dtype=torch.uint8),
                                  torch.zeros(4, 2, dtype=torch.float8_e4m3fn), torch.ones(1), torch.float32, "emulation"),
         TypeError, "packed uint8"),
        (lambda: torch.ops.fp4.linear(torch.randn(2, 32), torch.zeros(4, 16, dtype=torch.uint8),
                                      torch.zeros(4, 2, dtype=torch.float8_e4m3fn), torch.ones(1), torch.ones(1), None, 4, "nope"),
         ValueError, "unknown NVFP4 backend"),
        (lambda: torch.ops.fp4.linear(torch.randn(2, 32), torch.zeros(4, 16, dtype=torch.uint8),
                                      torch.zeros(4, 2, dtype=torch.float8_e4m3fn), torch.ones(1), torch.ones(1),
                                      torch.ones(3), 4, "emulation"),
         ValueError, "bias must have shape"),
        (lambda: torch.ops.fp4.linear(torch.randn(2, 32, dtype=torch.bfloat16), torch.zeros(4, 16, dtype=torch.uint8),
                                      torch.zeros(4, 2, dtype=torch.float8_e4m3fn), torch.ones(1), torch.ones(1),
                                      torch.ones(4), 4, "emulation"),
         TypeError, "bias must have x's dtype"),
    ],
)
def test_op_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()

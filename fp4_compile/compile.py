"""The ``fp4`` torch.compile backend: Inductor plus the project's post-grad passes.

    model = torch.compile(model, backend="fp4")                     # entry point, no import needed
    model = torch.compile(model, backend="fp4", mode="reduce-overhead")
    model = torch.compile(model, backend=fp4_backend, options={"max_autotune": True})

``mode`` and ``options`` mean what they mean for ``backend="inductor"``: the mode's
Inductor options (``torch._inductor.list_mode_options``) are applied first, then
``options``. The backend installs :class:`~fp4_compile.passes.FP4PostGradPass` as
Inductor's ``post_grad_custom_post_pass`` (a pass given there in ``options`` runs after
ours, inside it). Before compiling, every fp4 op's ``backend`` argument is checked for
the device of its tensors, so an unavailable backend fails when the model is compiled
(:class:`BackendUnavailableError`, a :class:`~fp4_compile.backends.BackendError`), not
inside a kernel.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch._dynamo.exc import ShortenTraceback

from .backends import BackendError, resolve_backend

if TYPE_CHECKING:
    from .passes.manager import FP4PostGradPass

logger = logging.getLogger(__name__)

BACKEND_NAME = "fp4"


@functools.cache
def default_pass() -> FP4PostGradPass:
    """The process-wide FP4PostGradPass (imported lazily: the pattern matcher is slow to import)."""
    from .passes.manager import FP4PostGradPass

    return FP4PostGradPass()


class BackendUnavailableError(BackendError, ShortenTraceback):
    """A :class:`BackendError` raised while compiling.

    Dynamo wraps any exception from a backend compiler in ``BackendCompilerFailed``,
    except ``ShortenTraceback`` (torch 2.11 and 2.13 alike): deriving from it lets this
    error reach the caller as itself, so ``except BackendError`` works around the first
    call of a compiled model.
    """

    def __init__(self, message: str) -> None:
        ValueError.__init__(self, message)
        self.first_useful_frame = None


def _fp4_overload(target: Any) -> torch._ops.OpOverload | None:
    if isinstance(target, torch._ops.OpOverload):
        return target if target.namespace == "fp4" else None
    if isinstance(target, torch._ops.OpOverloadPacket) and target._qualified_op_name.startswith("fp4::"):
        return target.default
    return None


def _node_device(node: torch.fx.Node) -> torch.device | None:
    for arg in node.all_input_nodes:
        val = arg.meta.get("example_value", arg.meta.get("val"))
        if isinstance(val, torch.Tensor):
            return val.device
    return None


def _source_line(node: torch.fx.Node) -> str:
    """'File "...", line N, in f: code' of the user code that called the op, if known."""
    lines = [line.strip() for line in node.meta.get("stack_trace", "").splitlines() if line.strip()]
    files = [i for i, line in enumerate(lines) if line.startswith("File ")]
    if not files:
        return node.name
    i = files[-1]
    return lines[i] + (f": {lines[i + 1]}" if i + 1 < len(lines) else "")


def check_backends(gm: torch.fx.GraphModule) -> list[tuple[str, torch.device]]:
    """Resolve the ``backend`` argument of every fp4 op in ``gm`` for its tensors' device.

    Returns the distinct (backend, device) pairs; raises :class:`BackendUnavailableError`.
    """
    seen: dict[tuple[str, torch.device], None] = {}
    for node in gm.graph.nodes:
        op = _fp4_overload(node.target) if node.op == "call_function" else None
        if op is None:
            continue
        names = [a.name for a in op._schema.arguments]
        if "backend" not in names:
            continue
        index = names.index("backend")
        backend = node.args[index] if index < len(node.args) else node.kwargs.get("backend")
        device = _node_device(node)
        if not isinstance(backend, str) or device is None or (backend, device) in seen:
            continue
        try:
            resolve_backend(backend, device)
        except BackendError as e:
            raise BackendUnavailableError(f"{e}\n(while compiling {op} at {_source_line(node)})") from None
        seen[(backend, device)] = None
    return list(seen)


def inductor_config_patches(mode: str | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Inductor config patches for ``mode``/``options``, with our post-grad pass and PDL for Inductor's
    kernels (``ops.pdl.inductor_pdl_patch``; ``options={"triton.enable_pdl": False}`` turns it off)."""
    from .ops.pdl import inductor_pdl_patch

    patches: dict[str, Any] = inductor_pdl_patch()
    if mode is not None and mode != "default":
        patches.update(torch._inductor.list_mode_options(mode))
    patches.update(options or {})
    user_pass = patches.pop("post_grad_custom_post_pass", None)
    if user_pass is None:
        patches["post_grad_custom_post_pass"] = default_pass()
    else:
        from .passes.manager import FP4PostGradPass

        patches["post_grad_custom_post_pass"] = FP4PostGradPass(extra=user_pass)
    return patches


def fp4_backend(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """torch.compile backend: Inductor's ``compile_fx`` with the NVFP4 fusion pass."""
    from torch._inductor.compile_fx import compile_fx

    check_backends(gm)
    patches = inductor_config_patches(mode, options)
    return compile_fx(gm, example_inputs, config_patches=patches)


def register() -> None:
    """Register ``backend="fp4"`` by name (idempotent).

    Safe to call from the package's ``__init__`` even when Dynamo is importing the package
    through the ``torch_dynamo_backends`` entry point (it then registers the entry point's
    function itself; registering twice would fail with "duplicate name: fp4").
    """
    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS, register_backend

    if BACKEND_NAME not in _COMPILER_FNS and BACKEND_NAME not in _BACKENDS:
        register_backend(fp4_backend, name=BACKEND_NAME)

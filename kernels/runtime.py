"""Checks shared by the kernel launchers: can this kernel run on this device here?"""

from __future__ import annotations

__all__ = ["runnable_kernel"]


def runnable_kernel(kernel, device, reference: str):
    """The kernel, checked to be runnable on ``device``; ``reference`` names the torch fallback.

    Triton decides once, when a kernel is defined (at import), whether it is compiled or
    interpreted; CPU tensors need the interpreter, and so does triton's own standard library
    (tl.max, tl.sum) that a kernel calls, so the choice cannot be made here per call.
    """
    if device.type == "cpu" and type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(
            "Triton kernels on CPU tensors need the interpreter: set TRITON_INTERPRET=1 "
            f"before triton is first imported, or use {reference}"
        )
    return kernel

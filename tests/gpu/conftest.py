"""GPU tests: real sizes, real devices. Every test here skips, with the reason, without CUDA.

Run them in a pytest session of their own and without TRITON_INTERPRET: triton decides at
import whether a kernel is compiled or interpreted, and these tests need compiled kernels.
"""

import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_reason():
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"CUDA is not available (torch {torch.__version__}); GPU tests need an NVIDIA GPU"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _cuda_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if str(item.path).startswith(HERE + os.sep):
            item.add_marker(skip)


@pytest.fixture
def compiled_kernels():
    """Skip when this session's kernels were defined for the interpreter."""
    from kvpool.kernels import paged_copy

    if type(paged_copy._paged_copy_kernel).__name__ == "InterpretedFunction":
        pytest.skip("kernels were imported under TRITON_INTERPRET=1; run tests/gpu on its own")

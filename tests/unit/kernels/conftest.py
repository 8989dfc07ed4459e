"""Kernel tests run under the Triton interpreter on CPU tensors.

``TRITON_INTERPRET`` is read when triton is first imported, so it is set here, before any
test module (or kvpool.kernels) can import triton. Without triton the kernel tests skip;
the torch references are still exercised where a test needs no kernel.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

torch = pytest.importorskip("torch", reason="the kernel tests need torch (CPU build is enough)")

try:  # noqa: E402
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - CI installs triton
    HAVE_TRITON = False


@pytest.fixture
def need_triton():
    if not HAVE_TRITON:
        pytest.skip("triton is not installed: pip install 'kvpool[gpu]' to run kernel tests")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

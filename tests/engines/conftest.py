"""Engine tests: run only in the engine environment (.venv-engines, built by `make test`).

They import the real vLLM and SGLang classes, so the main suite (whose venv has neither)
does not collect this folder; see ``collect_ignore`` in tests/conftest.py.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import start_serve

# vLLM must run its engine core in this process, and on the CPU platform.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A real `kvpool serve` (64 MiB DRAM) for a test module."""
    sp = start_serve(tmp_path_factory.mktemp("serve"))
    yield sp
    sp.stop()
    if os.path.exists(sp.shm_path):
        os.unlink(sp.shm_path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from tests.engines.vllm_harness import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))

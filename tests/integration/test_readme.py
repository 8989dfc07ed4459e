"""The README's client example runs as written against a real server."""

from __future__ import annotations

import re

import torch
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_client_example_runs(server):
    text = README.read_text()
    code = re.search(r"## Using the client\s+```python\n(.*?)```", text, re.S).group(1)
    assert len([l for l in code.splitlines() if l.strip()]) <= 10
    scope: dict = {}
    exec(compile(code.replace("127.0.0.1:50051", server.address), "README.md", "exec"), scope)
    out, kv = scope["out"], scope["kv"]
    assert out.shape == kv.shape == (6, *scope["layout"].shape)
    assert torch.equal(out.view(torch.int16), kv.view(torch.int16))  # bit-exact, NaN-safe


def test_readme_quick_start_is_two_commands():
    text = README.read_text()
    block = re.search(r"## Quick start\s+```sh\n(.*?)```", text, re.S).group(1)
    commands = [l.split("#")[0].strip() for l in block.splitlines() if l.strip()]
    assert commands == ["make run", "make test"]
    assert "make test" in (README.parent / ".ci" / "run").read_text()

"""The generated stubs must match proto/: regenerate with `python tools/gen_proto.py`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_stubs_are_fresh():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_check_detects_stale_stubs(tmp_path, monkeypatch):
    # Run the checker on a copy of the repo's proto tree with one extra field.
    import shutil

    copy = tmp_path / "repo"
    for part in ("proto", "kvpool/rpc/v1", "tools"):
        shutil.copytree(ROOT / part, copy / part)
    proto = copy / "proto" / "kvpool" / "v1" / "common.proto"
    proto.write_text(proto.read_text() + "\nmessage StaleCheckExtra {\n  uint32 x = 1;\n}\n")
    r = subprocess.run([sys.executable, str(copy / "tools" / "gen_proto.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 1 and "common_pb2.py" in r.stderr

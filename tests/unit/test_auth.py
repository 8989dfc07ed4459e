"""Token tables, token resolution and the loopback rule (kvpool.auth)."""

from __future__ import annotations

import pytest

from kvpool.auth import ADMIN, CLIENT, TokenTable, is_loopback, resolve_token

GOOD = "a" * 16


def test_table_lines_and_their_errors():
    t = TokenTable.parse(f"# comment\n\n{GOOD} client alice\n{'b' * 20} admin  # ops\n")
    assert t.get(GOOD).role == CLIENT and t.get(GOOD).tenant == "alice" and t.get("b" * 20).role == ADMIN
    assert t.get("nope") is None
    for text, why in [(f"{GOOD} root", "unknown role"), ("short client x", "at least 16"),
                      (f"{GOOD} client", "names its tenant"), (f"{GOOD} admin alice", "only client tokens"),
                      (f"{GOOD} node\n{GOOD} node", "listed twice"), ("# nothing", "no tokens"),
                      (f"{GOOD} client {'t' * 65}", "at most 64")]:
        with pytest.raises(ValueError, match=why):
            TokenTable.parse(text)


def test_token_precedence(tmp_path):
    f = tmp_path / "tok"
    f.write_text("from-file\n")
    assert resolve_token("flag", str(f), {"KVPOOL_TOKEN": "env"}) == "flag"
    assert resolve_token(None, str(f), {"KVPOOL_TOKEN": "env"}) == "from-file"
    assert resolve_token(None, None, {"KVPOOL_TOKEN": "env", "KVPOOL_TOKEN_FILE": str(f)}) == "env"
    assert resolve_token(None, None, {"KVPOOL_TOKEN_FILE": str(f)}) == "from-file"
    assert resolve_token(None, None, {}) is None
    with pytest.raises(ValueError, match="cannot read the token file"):
        resolve_token(None, str(tmp_path / "missing"), {})


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                       ("localhost", True), ("0.0.0.0", False), ("10.0.0.1", False),
                                       ("::", False), ("example.com", False)])
def test_loopback(host, loop):
    assert is_loopback(host) is loop

"""Common client flags go before or after the subcommand, for every client subcommand,
including ones registered after kvpool.cli.flags was written."""

from __future__ import annotations

import argparse

import pytest

from kvpool.cli.flags import COMMON_FLAGS, install_common_flags, mark_server_command
from kvpool.cli.main import build_parser


@pytest.mark.parametrize("argv", [
    ["--json", "--address", "h:1", "--timeout", "3", "admin", "stats"],
    ["admin", "--json", "--address", "h:1", "--timeout", "3", "stats"],
    ["admin", "stats", "--json", "--address", "h:1", "--timeout", "3"],
    ["--address", "h:1", "admin", "--timeout", "3", "stats", "--json"],
])
def test_common_flags_anywhere(argv):
    args = build_parser().parse_args(argv)
    assert (args.json, args.address, args.timeout) == (True, "h:1", 3.0)


def test_closest_to_the_command_wins_and_defaults_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("KVPOOL_ADDRESS", "env:9")
    args = build_parser().parse_args(["admin", "stats"])
    assert (args.json, args.address, args.timeout) == (False, "env:9", 10.0)
    args = build_parser().parse_args(["--address", "a:1", "admin", "stats", "--address", "b:2"])
    assert args.address == "b:2"


def test_a_subcommand_added_later_gets_them_and_server_commands_do_not():
    parser = argparse.ArgumentParser(prog="kvpool")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo")
    demo.add_argument("--prompts", type=int, default=1)
    mark_server_command(sub.add_parser("serve"))
    install_common_flags(parser)
    args = parser.parse_args(["demo", "--prompts", "2", "--address", "x:1", "--json"])
    assert (args.prompts, args.address, args.json) == (2, "x:1", True)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--json"])
    assert [f.name for f in COMMON_FLAGS][:3] == ["--address", "--json", "--timeout"]


def test_a_subcommand_keeps_its_own_flag_of_the_same_name():
    args = build_parser().parse_args(["replay", "t.jsonl", "--capacity", "4", "--json"])
    assert args.json is True and args.capacity == [4]
    assert build_parser().parse_args(["--json", "replay", "t.jsonl", "--capacity", "4"]).json is True
    assert build_parser().parse_args(["replay", "t.jsonl", "--capacity", "4"]).json is False


def test_server_settings_ignore_the_client_flags(tmp_path):
    from kvpool.cli.flags import settings_from_args
    from kvpool.config import ServeSettings

    args = build_parser().parse_args(["--json", "serve", "--port", "7", "--data-dir", str(tmp_path)])
    assert settings_from_args(ServeSettings, args).port == 7


@pytest.mark.parametrize("argv", [
    ["--token", "t0k", "--tls-ca", "ca.pem", "admin", "drain", "n1"],
    ["admin", "--token", "t0k", "drain", "n1", "--tls-ca", "ca.pem"],
    ["admin", "drain", "n1", "--tls-ca", "ca.pem", "--token", "t0k"],
    ["--tls-ca", "ca.pem", "admin", "top", "--token", "t0k"],
])
def test_credentials_are_common_flags(argv):
    args = build_parser().parse_args(argv)
    assert (args.token, args.tls_ca) == ("t0k", "ca.pem")
    assert (args.token_file, args.tls_cert, args.tls_key) == (None, None, None)


def test_admin_channel_takes_credentials_from_flags_then_environment(tmp_path, monkeypatch):
    from kvpool.cli.output import credentials

    for name in ("KVPOOL_TOKEN", "KVPOOL_TOKEN_FILE", "KVPOOL_TLS_CA", "KVPOOL_TLS_CERT", "KVPOOL_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert credentials(build_parser().parse_args(["admin", "stats"])) == (None, None)
    path = tmp_path / "admin.token"
    path.write_text("from-file\n")
    monkeypatch.setenv("KVPOOL_TOKEN", "from-env")
    monkeypatch.setenv("KVPOOL_TLS_CA", "env-ca.pem")
    token, tls = credentials(build_parser().parse_args(["admin", "stats", "--token-file", str(path)]))
    assert token == "from-file" and tls.ca == "env-ca.pem"
    token, tls = credentials(build_parser().parse_args(["admin", "stats", "--tls-ca", "ca.pem"]))
    assert token == "from-env" and tls.ca == "ca.pem"

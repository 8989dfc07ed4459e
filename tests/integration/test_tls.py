"""TLS and mutual TLS on gRPC and on the TCP data plane, with certificates the test makes.

The CA, the server's certificate (for 127.0.0.1) and a client certificate are made with the
``cryptography`` package, then real processes serve with them.
"""

from __future__ import annotations

import datetime
import json
import ipaddress
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kvpool import Client
from kvpool.errors import Unavailable
from kvpool.transport.frames import REQUEST, REQUEST_MAGIC
from tests.conftest import start_kvpool
from tests.integration.helpers import fresh_namespace, random_blocks, wait_for


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool = False, sans=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path, cert=None, key=None):
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA; a certificate for 127.0.0.1/localhost (servers, and nodes as clients); a client's;
    and a certificate from a CA nobody trusts."""
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("kvpool test CA", ca_key, _name("kvpool test CA"), ca_key, ca=True)
    out = {"ca": _write(d / "ca.pem", cert=ca)}
    sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    for who, issuer, issuer_key in (("server", ca.subject, ca_key), ("client", ca.subject, ca_key)):
        key = ec.generate_private_key(ec.SECP256R1())
        out[who] = (_write(d / f"{who}.pem", cert=_cert(who, key, issuer, issuer_key, sans=sans)),
                    _write(d / f"{who}.key", key=key))
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue_ca = _cert("rogue", rogue_key, _name("rogue"), rogue_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    out["rogue"] = (_write(d / "rogue.pem", cert=_cert("rogue client", key, rogue_ca.subject, rogue_key, sans=sans)),
                    _write(d / "rogue.key", key=key))
    return out


def _round_trip(address: str, **kw) -> None:
    ns = fresh_namespace()
    keys, data = [os.urandom(16) for _ in range(4)], random_blocks(4, seed=4)
    with Client(address, ns, transport="tcp", connect_timeout=3, io_timeout=5, timeout=10, **kw) as c:
        assert c.put_blocks(keys, data).written == 4
        assert np.array_equal(np.stack(c.get_blocks(keys)), data)
        assert c._async.transports.open_kinds() == {1: "tcp"} or set(c._async.transports.open_kinds().values()) == {"tcp"}


def _plaintext_request_is_refused(data_address: str) -> None:
    host, port = data_address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(REQUEST.pack(REQUEST_MAGIC, 1, 0, 0, 0, 0, 0, bytes(32)))
        try:
            got = s.recv(64)
        except (ConnectionResetError, socket.timeout):
            got = b""
    assert not got.startswith(b"KVR1")  # never a kvpool answer in the clear


def test_tls_on_grpc_and_the_data_port(serve_factory, pki):
    cert, key = pki["server"]
    sp = serve_factory("--tls-cert", cert, "--tls-key", key)
    assert "serve TLS" in sp.log()
    data_address = next(p.split("=", 1)[1] for line in sp.lines for p in line.split() if p.startswith("data="))
    _round_trip(sp.address, tls_ca=pki["ca"])
    # A plaintext client reaches neither port.
    with Client(sp.address, fresh_namespace(), timeout=3) as plain, pytest.raises(Unavailable):
        plain.stats()
    _plaintext_request_is_refused(data_address)
    # A client that trusts another CA refuses the server.
    with Client(sp.address, fresh_namespace(), timeout=3, tls_ca=pki["rogue"][0]) as wrong, pytest.raises(Unavailable):
        wrong.stats()
    _round_trip(sp.address, tls_ca=pki["ca"])  # still serving


def test_mutual_tls_requires_a_client_certificate(serve_factory, pki):
    cert, key = pki["server"]
    sp = serve_factory("--tls-cert", cert, "--tls-key", key, "--tls-ca", pki["ca"])
    assert "mutual TLS" in sp.log()
    for kw in ({}, {"tls_cert": pki["rogue"][0], "tls_key": pki["rogue"][1]}):
        with Client(sp.address, fresh_namespace(), timeout=3, tls_ca=pki["ca"], **kw) as c, pytest.raises(Unavailable):
            c.stats()
    ccert, ckey = pki["client"]
    _round_trip(sp.address, tls_ca=pki["ca"], tls_cert=ccert, tls_key=ckey)
    # The admin CLI, as typed, with its certificate; and without one it is refused.
    base = [sys.executable, "-m", "kvpool", "admin", "--address", sp.address, "--tls-ca", pki["ca"]]
    r = subprocess.run(base + ["--tls-cert", ccert, "--tls-key", ckey, "stats"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "blocks" in r.stdout, r.stderr
    r = subprocess.run(base + ["--timeout", "3", "stats"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot reach" in r.stderr


def test_master_and_node_over_mutual_tls(tmp_path, pki):
    cert, key = pki["server"]
    tls = ["--tls-cert", cert, "--tls-key", key, "--tls-ca", pki["ca"]]
    procs = []
    try:
        proc, m, _ = start_kvpool(["master", "--port", "0", "--metrics-port", "-1", "--heartbeat-interval", "0.2",
                                   *tls], r"ready grpc=(\S+)")
        procs.append(proc)
        address = m.group(1)
        proc, m, nlines = start_kvpool(["node", "--master", address, "--port", "0", "--data-dir",
                                        str(tmp_path / "n"), "--nvme", "8MiB", *tls], r"ready control=(\S+)")
        procs.append(proc)
        # The node registers over mTLS with its certificate; the master demotes through the
        # node's mTLS control port; clients move bytes over the node's TLS data port.
        ccert, ckey = pki["client"]
        kw = dict(tls_ca=pki["ca"], tls_cert=ccert, tls_key=ckey)
        with Client(address, fresh_namespace(), **kw) as c:
            assert wait_for(lambda: c.stats().nodes == 1, 15)
        _round_trip(address, **kw)
        env = {"KVPOOL_TLS_CA": pki["ca"], "KVPOOL_TLS_CERT": ccert, "KVPOOL_TLS_KEY": ckey}
        r = subprocess.run([sys.executable, "-m", "kvpool", "admin", "--address", address, "evict", "--all"],
                           capture_output=True, text=True, timeout=60, env={**os.environ, **env})
        assert r.returncode == 0 and "evicted 4 blocks" in r.stdout, (r.stdout, r.stderr)
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=20)


def test_readme_secure_client_example_runs(serve_factory, pki, tmp_path):
    """The README's client of tenant alice, with a token file and a CA, against a server that
    requires tokens and serves TLS."""
    import re
    import secrets
    from pathlib import Path

    token = secrets.token_hex(16)
    (tmp_path / "tokens").write_text(f"{token} client alice\n")
    (tmp_path / "alice.token").write_text(token + "\n")
    sp = serve_factory("--auth-tokens", str(tmp_path / "tokens"), "--tls-cert", pki["server"][0],
                       "--tls-key", pki["server"][1])
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"## Running kvpool securely.*?```python\n(.*?)```", text, re.S).group(1)
    code = (code.replace("10.0.0.1:50051", sp.address).replace('"alice.token"', repr(str(tmp_path / "alice.token")))
            .replace('"ca.pem"', repr(pki["ca"])))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["hits"] == 0


def test_a_certificate_that_does_not_match_its_key_fails_the_start(tmp_path, pki):
    r = subprocess.run([sys.executable, "-m", "kvpool", "serve", "--port", "0", "--data-dir", str(tmp_path / "d"),
                        "--tls-cert", pki["server"][0], "--tls-key", pki["client"][1]],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "do not load as a pair" in r.stderr


def test_drain_copies_node_to_node_over_tls_data_ports(tmp_path, pki):
    """Two nodes whose data ports speak mutual TLS: the drained node's blocks are pulled by the
    other over TLS, with that node's own --tls-* files (kvpool.tls.peer_context), and read back
    bit-exact. Without them the pull could only fail: a TLS data port never answers plaintext."""
    cert, key = pki["server"]
    tls = ["--tls-cert", cert, "--tls-key", key, "--tls-ca", pki["ca"]]
    ccert, ckey = pki["client"]
    kw = dict(tls_ca=pki["ca"], tls_cert=ccert, tls_key=ckey)
    env = {**os.environ, "KVPOOL_TLS_CA": pki["ca"], "KVPOOL_TLS_CERT": ccert, "KVPOOL_TLS_KEY": ckey}
    procs = []

    def start(args, pattern):
        proc, m, _ = start_kvpool(args, pattern)
        procs.append(proc)
        return m

    def admin(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kvpool", "admin", "--address", address, *args],
                              capture_output=True, text=True, timeout=120, env=env)

    def node(name: str) -> None:
        start(["node", "--master", address, "--port", "0", "--node-name", name, "--data-dir", str(tmp_path / name),
               *tls], r"ready control=\S+")

    try:
        address = start(["master", "--port", "0", "--metrics-port", "-1", "--heartbeat-interval", "0.5", *tls],
                        r"ready grpc=(\S+)").group(1)
        node("node-a")
        ns = fresh_namespace()
        keys, data = [os.urandom(16) for _ in range(8)], random_blocks(8, seed=12)
        with Client(address, ns, **kw) as c:
            assert wait_for(lambda: c.stats().nodes == 1, 15)
            assert c.put_blocks(keys, data).written == 8
            node("node-b")
            assert wait_for(lambda: c.stats().nodes == 2, 15)
        r = admin("drain", "node-a", "--json")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["moved"] == 8 and report["failed"] == 0 and report["remaining"] == 0, report
        listing = json.loads(admin("ls", "--limit", "100", "--json").stdout)["blocks"]
        assert report["node_id"] not in {b["node_id"] for b in listing} and len(listing) == 8
        with Client(address, ns, **kw) as c:
            out = c.get_blocks(keys)
            assert all(np.array_equal(np.frombuffer(o, np.uint8), d) for o, d in zip(out, data))
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=20)


def test_mutual_tls_alone_does_not_open_a_non_loopback_port(tmp_path, pki):
    """A certificate names no tenant or role: beyond loopback, tokens are required with mTLS too
    (else every certificate the CA signs would act as an admin of every tenant)."""
    import secrets

    cert, key = pki["server"]
    tls = ["--tls-cert", cert, "--tls-key", key, "--tls-ca", pki["ca"]]
    for cmd in (["master", "--metrics-port", "-1"], ["node", "--master", "127.0.0.1:1", "--data-dir", str(tmp_path / "n")]):
        r = subprocess.run([sys.executable, "-m", "kvpool", *cmd, "--host", "0.0.0.0", "--port", "0", *tls],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (cmd, r.stderr)
        assert "refusing to listen on 0.0.0.0 without authentication" in r.stderr and "mutual TLS" in r.stderr
    (tmp_path / "tokens").write_text(f"{secrets.token_hex(16)} admin\n")
    proc, _, lines = start_kvpool(["master", "--host", "0.0.0.0", "--port", "0", "--metrics-port", "-1",
                                   "--auth-tokens", str(tmp_path / "tokens"), *tls], r"ready grpc=(\S+)")
    try:
        assert any("bearer tokens required" in line for line in lines)
    finally:
        proc.terminate()
        proc.wait(timeout=20)

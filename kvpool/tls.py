"""TLS and mutual TLS for every port that leaves the host: gRPC and the TCP data plane.

One set of PEM files configures a process, on both sides of its connections:

* ``tls_cert`` + ``tls_key``: this process's certificate chain and key. A server presents
  them; a client presents them when the server asks for one (mTLS).
* ``tls_ca``: the CA bundle that signs the peers. A client verifies servers against it (and
  their certificate must name the address dialled: IP SAN or DNS name). A server given a
  CA requires and verifies a client certificate: mutual TLS.

A server with a cert and key serves only TLS; a client uses TLS when it has a CA (gRPC), or
when the node's endpoint says its data port speaks TLS (``NodeEndpoint.tcp_tls``).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import grpc

__all__ = ["TlsFiles", "server_credentials", "open_channel", "open_aio_channel", "server_context",
           "client_context", "peer_context"]


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"cannot read the TLS {what} {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class TlsFiles:
    """Paths of PEM files (any may be empty)."""

    cert: str = ""
    key: str = ""
    ca: str = ""

    @classmethod
    def of(cls, settings) -> "TlsFiles | None":
        """From an object with ``tls_cert``, ``tls_key`` and ``tls_ca``; None when TLS is off."""
        files = cls(getattr(settings, "tls_cert", "") or "", getattr(settings, "tls_key", "") or "",
                    getattr(settings, "tls_ca", "") or "")
        return files if (files.cert or files.key or files.ca) else None

    def validate(self, *, serving: bool) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("tls_cert and tls_key go together: give both, or neither")
        if serving and not self.cert:
            raise ValueError("a server needs tls_cert and tls_key to serve TLS (tls_ca alone only verifies peers)")
        for path, what in ((self.cert, "certificate"), (self.key, "key"), (self.ca, "CA bundle")):
            if path:
                _read(path, what)
        if self.cert:
            server_context(self)  # a cert that does not match its key fails here, at start


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """gRPC server credentials; with a CA, clients must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(_read(files.key, "key"), _read(files.cert, "certificate"))],
        root_certificates=_read(files.ca, "CA bundle") if files.ca else None,
        require_client_auth=bool(files.ca))


def _channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(files.ca, "CA bundle") if files.ca else None,
        private_key=_read(files.key, "key") if files.key else None,
        certificate_chain=_read(files.cert, "certificate") if files.cert else None)


def open_channel(address: str, files: TlsFiles | None, options=None) -> grpc.Channel:
    """A blocking gRPC channel: TLS when ``files`` has a CA, else plaintext."""
    if files is not None and files.ca:
        return grpc.secure_channel(address, _channel_credentials(files), options=options)
    return grpc.insecure_channel(address, options=options)


def open_aio_channel(address: str, files: TlsFiles | None, options=None) -> grpc.aio.Channel:
    """An asyncio gRPC channel: TLS when ``files`` has a CA, else plaintext."""
    if files is not None and files.ca:
        return grpc.aio.secure_channel(address, _channel_credentials(files), options=options)
    return grpc.aio.insecure_channel(address, options=options)


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The data server's TLS context; with a CA, clients must present a certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(files.cert, files.key)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"tls_cert {files.cert} and tls_key {files.key} do not load as a pair: {exc}") from None
    if files.ca:
        ctx.load_verify_locations(files.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A data-plane client's TLS context: verifies the node against the CA, and presents
    this process's certificate for mTLS when it has one."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=files.ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if files.cert:
        ctx.load_cert_chain(files.cert, files.key)
    return ctx


def peer_context(files: TlsFiles | None) -> ssl.SSLContext | None:
    """How a node dials other nodes' data ports when it copies from them (drain, replicas):
    with its own files, as it dials the master. None without a CA: the node then cannot
    verify a TLS peer, and the transport says so rather than copying in plaintext."""
    return client_context(files) if files is not None and files.ca else None

"""Settings of a kvpool process, from flags, a TOML file and ``KVPOOL_*`` variables.

Precedence, highest first: command-line flags, the TOML file (``--config`` or
``KVPOOL_CONFIG``), environment variables, built-in defaults. Every setting has the same
name everywhere: ``--metrics-port`` on the command line, ``metrics_port`` in TOML,
``KVPOOL_METRICS_PORT`` in the environment. Sizes accept units: ``4GiB``, ``512MiB``,
``2G`` (decimal) or plain bytes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from dataclasses import dataclass, fields
from typing import Any, Mapping

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["MasterSettings", "NodeSettings", "ServeSettings", "TierSettings", "parse_size", "format_size", "resolve_settings", "SIZE_FIELDS"]

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """``"4GiB"`` -> 4294967296. Binary units (KiB, MiB, GiB) and decimal (KB, MB, GB)."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read size {text!r}; write it like 4GiB, 512MiB, 2GB or 1048576")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 0:
        raise ValueError(f"size must not be negative: {text!r}")
    return value


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}B"


@dataclass
class MasterSettings:
    """Settings of a master (``kvpool master``, and the master inside ``kvpool serve``)."""

    host: str = "127.0.0.1"
    port: int = 50051
    #: Prometheus exporter port; 0 picks a free one, -1 disables it.
    metrics_port: int = 9464
    #: Address of the Prometheus exporter, which authenticates nobody (it shows counts and
    #: node names, never tenants, keys or bytes). Empty: the --host address.
    metrics_host: str = ""
    #: Settings never import the master (docs/design.md §5): this equals
    #: kvpool.master.eviction.DEFAULT_POLICY, and tests/unit/test_config.py keeps it so.
    eviction_policy: str = "lhd"
    high_watermark: float = 0.95
    low_watermark: float = 0.90
    lease_ttl: float = 30.0
    grant_ttl: float = 30.0
    max_batch: int = 65536
    #: Copy every committed block to NVMe too, on nodes that have an NVMe tier.
    write_through: bool = False
    #: Seconds between node heartbeats; a node that misses 5 is forgotten.
    heartbeat_interval: float = 1.0
    log_level: str = "info"
    #: Port of the KV-event publisher (ZMQ PUB, vLLM's KV event format); 0 picks one, -1
    #: (the default) turns it off.
    events_port: int = -1
    #: Address the KV-event publisher binds. ZMQ PUB authenticates nobody and carries every
    #: tenant's events, so it is for trusted routers: loopback unless ``insecure``.
    events_host: str = "127.0.0.1"
    #: ZMQ topic of the KV event messages.
    events_topic: str = ""
    #: Copies of each committed block, on nodes of different hosts (1: no replicas). Copies
    #: go node to node over the data plane; a dead node's blocks stay readable from the others.
    replicas: int = 1
    #: Copies a block may gain beyond its namespace's replicas on hosts that read it often
    #: (READ_COPY_AFTER reads from one host): 0 (the default) makes none.
    read_replicas: int = 0
    #: Redis URL (redis://host:port/db) for shared metadata and leader election among
    #: several masters; empty: this master keeps its metadata in memory only.
    redis: str = ""
    #: Prefix of every Redis key; masters of one pool share it.
    redis_prefix: str = "kvpool"
    #: Seconds a leader's lease lives unless renewed: a standby takes over this long after
    #: the leader stops.
    leader_ttl: float = 3.0
    #: When a commit is answered with Redis: "sent" (once the write that carries it is in the
    #: kernel's socket buffer: a kill -9 of the master loses no answered commit), "wait" (after
    #: Redis's reply) or "background" (at once; a kill -9 can lose the last ones). See
    #: kvpool.master.metastore.
    redis_commit: str = "sent"
    #: Changes not yet written to Redis past which commits wait for the writer (backpressure).
    redis_backlog: int = 65536
    #: Address that standbys hand clients and nodes to reach this master when it leads, when
    #: it binds a wildcard address. Empty: the bind address.
    advertise_host: str = ""
    #: File of bearer tokens (token, role, tenant; kvpool.auth). Empty: no authentication,
    #: which is allowed only on a loopback address unless ``insecure``.
    auth_tokens: str = ""
    #: Serve a non-loopback address without tokens (a network where every peer is trusted).
    insecure: bool = False
    #: Largest gRPC message the master accepts; bigger ones are refused (RESOURCE_EXHAUSTED)
    #: from their length prefix, before they are read. A node's registration lists every
    #: block on its NVMe (~60 bytes each), so raise it for very large NVMe tiers.
    max_message_bytes: int = 64 * 2**20
    #: PEM files for TLS on gRPC and the data port (kvpool.tls). With ``tls_ca``, peers must
    #: present a certificate it signed (mutual TLS), and the master uses it to reach nodes.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    #: Byte quotas per tenant and memory tier: "alice:dram=8GiB,bob:dram=2GiB,bob:hbm=1GiB"
    #: (":dram=..." is the default tenant). See :func:`parse_quotas`.
    quotas: str = ""

    def validate(self) -> None:
        if self.redis and not self.redis.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis {self.redis!r}: give a URL such as redis://127.0.0.1:6379/0")
        if not -1 <= self.events_port < 65536:
            raise ValueError(f"events_port {self.events_port} is out of range (-1 disables, 0 picks)")
        if self.events_port >= 0:
            refuse_open_events(self.events_host, self.insecure)
        if not 1 <= self.replicas <= 8:
            raise ValueError(f"replicas {self.replicas}: keep between 1 and 8 copies of each block")
        if not 0 <= self.read_replicas <= 7:
            raise ValueError(f"read_replicas {self.read_replicas}: between 0 (off) and 7 extra copies of a block")
        if self.leader_ttl <= 0:
            raise ValueError("leader_ttl must be positive seconds")
        if self.redis_commit not in ("sent", "wait", "background"):
            raise ValueError(f"redis_commit {self.redis_commit!r}: choose sent, wait or background")
        if self.redis_backlog < 1:
            raise ValueError(f"redis_backlog {self.redis_backlog}: allow at least one unwritten change")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} is out of range (0-65535; 0 picks a free port)")
        validate_tls(self)
        parse_quotas(self.quotas)
        if self.auth_tokens:
            from kvpool.auth import TokenTable

            TokenTable.load(self.auth_tokens)  # a bad file fails the start, saying which line
        else:
            # Mutual TLS is not enough: it proves a peer holds a certificate of the CA, and without
            # tokens every such peer would act as an admin of every tenant.
            refuse_open_port(self.host, self.insecure, "--auth-tokens FILE (with mutual TLS too: a certificate "
                             "names no tenant or role)")
        if not -1 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port {self.metrics_port} is out of range (-1 disables, 0 picks)")
        if not 0 < self.low_watermark <= self.high_watermark <= 1:
            raise ValueError("need 0 < low_watermark <= high_watermark <= 1")
        if self.lease_ttl <= 0 or self.grant_ttl <= 0 or self.heartbeat_interval <= 0:
            raise ValueError("lease_ttl, grant_ttl and heartbeat_interval must be positive seconds")


@dataclass
class TierSettings:
    """The storage of a node (``kvpool node``, and the node inside ``kvpool serve``)."""

    dram: int = 4 * 2**30
    #: HBM tier size on the current CUDA device; 0 disables it. Needs CUDA.
    hbm: int = 0
    #: NVMe tier size, in ``data_dir/nvme``; 0 disables the tier.
    nvme: int = 0
    data_dir: str = "./kvpool-data"
    node_name: str = dataclasses.field(default_factory=socket.gethostname)
    #: Slab chunk size: the largest block a tier accepts, and its allocation granule.
    slab_bytes: int = 64 * 2**20
    #: Touch every page of the DRAM tier at start so no put pays for page faults.
    prefault: bool = True
    #: Port of the TCP data server, on the same address as gRPC; 0 picks a free one (clients
    #: learn it from the master). -1 turns it off: then only same-host clients reach the node.
    data_port: int = 0
    #: Address other hosts reach this node's data plane at, when it binds a wildcard address
    #: (0.0.0.0) or sits behind NAT. Empty: the bind address.
    advertise_host: str = ""
    #: Register the DRAM arena with UCX for one-sided GET/PUT (needs ucxx: pip install kvpool[ucx]).
    ucx: bool = False

    def validate_tiers(self) -> None:
        if self.dram <= 0:
            raise ValueError("dram must be a positive size such as 4GiB")
        if not -1 <= self.data_port < 65536:
            raise ValueError(f"data_port {self.data_port} is out of range (-1 disables, 0 picks a free port)")


@dataclass
class ServeSettings(TierSettings, MasterSettings):
    """Settings of ``kvpool serve``: a master and a node in one process."""

    def validate(self) -> None:
        MasterSettings.validate(self)
        self.validate_tiers()
        if self.write_through and not self.nvme:
            raise ValueError("write_through needs an NVMe tier: set nvme (e.g. --nvme 64GiB)")


@dataclass
class NodeSettings(TierSettings):
    """Settings of ``kvpool node``: storage that registers with a master."""

    master: str = "127.0.0.1:50051"
    host: str = "127.0.0.1"
    #: Port of the node's NodeControl service (the master calls it); 0 picks one.
    port: int = 50061
    #: Prometheus port of the node's own tier metrics; -1 (the default) turns it off, so that
    #: several nodes on one host need no port each.
    metrics_port: int = -1
    #: Address of the node's exporter (no authentication); empty: the --host address.
    metrics_host: str = ""
    log_level: str = "info"
    #: The node's bearer token (role ``node``) for the master; the node's control service
    #: then accepts only calls bearing it. Or ``token_file``, ``KVPOOL_TOKEN_FILE``.
    token: str = ""
    token_file: str = ""
    insecure: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""

    def validate(self) -> None:
        self.validate_tiers()
        validate_tls(self)
        if not (self.token or self.token_file):  # mutual TLS alone admits any certificate of the CA
            refuse_open_port(self.host, self.insecure, "--token-file FILE (a node token; with mutual TLS too)")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} is out of range (0-65535; 0 picks a free port)")


def parse_quotas(text: str) -> dict[str, dict[str, int]]:
    """``"alice:dram=8GiB, bob:hbm=1GiB"`` -> ``{"alice": {"dram": 8Gi}, "bob": {"hbm": 1Gi}}``.

    Quotas apply to the memory tiers clients write into (dram, hbm); a tenant past its quota
    loses its own least valuable blocks first (kvpool.master.index).
    """
    out: dict[str, dict[str, int]] = {}
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        m = re.fullmatch(r"([^:=]*):(\w+)=(.+)", item)
        if not m:
            raise ValueError(f"quotas: cannot read {item!r}; write TENANT:TIER=SIZE, e.g. alice:dram=8GiB")
        tenant, tier, size = m.groups()
        if tier not in ("dram", "hbm"):
            raise ValueError(f"quotas: {item!r}: quotas apply to the memory tiers dram and hbm, not {tier!r}")
        if tier in out.setdefault(tenant, {}):
            raise ValueError(f"quotas: {tenant or 'the default tenant'} has two {tier} quotas")
        out[tenant][tier] = parse_size(size)
    return out


def validate_tls(settings) -> None:
    from kvpool.tls import TlsFiles

    files = TlsFiles.of(settings)
    if files is not None:
        files.validate(serving=True)


def refuse_open_port(host: str, insecure: bool, remedy: str) -> None:
    """Refuse to serve gRPC beyond this machine without authentication, unless told to."""
    from kvpool.auth import is_loopback

    if not insecure and not is_loopback(host):
        raise ValueError(
            f"refusing to listen on {host} without authentication: anyone who reaches that address could "
            f"read every tenant's blocks and flush the pool. Give {remedy} (see README, \"Running kvpool "
            f"securely\"), listen on 127.0.0.1, or pass --insecure if every host on this network is trusted")


def refuse_open_events(host: str, insecure: bool) -> None:
    """Refuse to publish KV events beyond this machine unless told every peer is trusted."""
    from kvpool.auth import is_loopback

    if not insecure and not is_loopback(host):
        raise ValueError(
            f"refusing to publish KV events on {host}: the ZMQ socket authenticates nobody and carries every "
            f"tenant's block hashes. Keep --events-host on loopback for a router on this host, let routers "
            f"elsewhere subscribe over gRPC with their token (Admin/SubscribeEvents: a client token gets its "
            f"tenant's events only), or pass --insecure if every host that reaches {host} is trusted")


SIZE_FIELDS = {"dram", "hbm", "nvme", "slab_bytes", "max_message_bytes"}


def _coerce(name: str, kind: Any, value: Any) -> Any:
    if value is None:
        return None
    if name in SIZE_FIELDS:
        return parse_size(value)
    if kind in (bool, "bool"):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    if kind in (int, "int"):
        return int(value)
    if kind in (float, "float"):
        return float(value)
    return str(value)


def resolve_settings(cls, flags: Mapping[str, Any], *, config_path: str | None = None,
                     environ: Mapping[str, str] | None = None):
    """Build ``cls`` (a settings dataclass) from flags > TOML > environment > defaults.

    ``flags`` maps field names to values, with None for flags not given.
    """
    environ = os.environ if environ is None else environ
    known = {f.name: f.type for f in fields(cls)}
    values: dict[str, Any] = {}
    for name, kind in known.items():
        env = environ.get(f"KVPOOL_{name.upper()}")
        if env is not None and env != "":
            values[name] = _coerce(name, kind, env)
    config_path = config_path or environ.get("KVPOOL_CONFIG") or None
    if config_path:
        with open(config_path, "rb") as f:
            data = tomllib.load(f)
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(
                    f"{config_path}: unknown setting {key!r}; known settings: {', '.join(sorted(known))}"
                )
            values[name] = _coerce(name, known[name], value)
    for name, value in flags.items():
        if name in known and value is not None:
            values[name] = _coerce(name, known[name], value)
    settings = cls(**values)
    if hasattr(settings, "validate"):
        settings.validate()
    return settings

"""Node configuration: defaults < TOML file < ``MESHFED_*`` environment < command-line flags.

Every key is a field of :class:`NodeConfig`. A wrong value raises
:class:`~meshfed.errors.ConfigError` naming the key, where it came from and why it is wrong,
for example ``listen (from env MESHFED_LISTEN): '/ip4/1.2.3.4' is not a TCP multiaddr``.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .device.config import DeviceConfig
from .errors import ConfigError
from .transport import TransportLimits

__all__ = ["NodeConfig", "default_data_dir"]

ENV_PREFIX = "MESHFED_"
#: MESHFED_* variables that are not node configuration (MESHFED_SOAK sizes the slow tests).
#: MESHFED_* variables that are not settings: the test suite's soak switch, the log level of
#: third-party libraries (read by :func:`meshfed.logs.configure_logging`)
_RESERVED_ENV = frozenset({"MESHFED_SOAK", "MESHFED_LOG_LIBS"})


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/meshfed`` (``~/.local/share/meshfed`` when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "meshfed"


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """Everything a node can be told. All arguments are keyword-only.

    Attributes:
        data_dir: where the identity and the store live.
        store_file: the node's SQLite store (jobs, rounds, checkpoints, privacy): a file name
            under ``data_dir`` or an absolute path; empty: no store.
        transport: ``"libp2p"`` for real networks, ``"memory"`` for simulations.
        listen: TCP multiaddrs to listen on (libp2p): ``/ip4/<address>/tcp/<port>`` or
            ``/ip6/<address>/tcp/<port>``; port 0 takes any free port.
        bootstrap: multiaddrs (with ``/p2p/<id>``) to dial on start.
        max_message_bytes: the largest signed message accepted (arrays travel in chunks).
        max_array_bytes: the largest array accepted in one transfer.
        array_chunk_bytes: chunk size for arrays we send.
        replay_window_s: how old a message may be before it is rejected as stale.
        max_clock_skew_s: how far ahead of our clock a peer's timestamp may be.
        request_timeout_s: default deadline of a request.
        stop_timeout_s: how long a graceful stop may take before everything is cancelled.
        ping_interval_s: how often connected peers are pinged (0 turns it off).
        max_streams_per_peer: concurrent inbound streams and requests per peer.
        requests_per_second: sustained inbound request rate per peer.
        request_burst: burst allowance for that rate.
        log_level: ``debug``, ``info``, ``warning`` or ``error``.
        log_format: ``text`` or ``json`` (one JSON object per line).
        membership: run gossip membership and failure detection (on by default).
        roles: what this node offers: ``trainer``, ``inference``, ``relay``, ``client-only``.
        gossip_interval_s: how often membership gossips with random peers.
        max_view: 0 keeps a full view of the mesh; N keeps a Cyclon partial view of N peers.
        mdns: announce and discover peers on the LAN by multicast DNS (libp2p transport).
        market: buy and sell work (needs the store and membership).
        market_capacity: leases this node holds at once as a seller (0: it only buys).
        market_grant: credits a new node's ledger starts with (granted once).
        api: where the REST API listens, ``<host>:<port>`` (``[<ipv6>]:<port>``; port 0: any
            free one, written to ``<data_dir>/api.json``), or ``off``. Beyond loopback it
            needs the bearer token (always created in ``data_dir``). libp2p nodes only: a
            memory-transport node is a simulation and serves no API.
        relay_packets_per_s: onion packets this node relays per second at most, as a relay
            (those beyond are dropped and counted as ``relay_cap``).
        relay_bytes_per_day: onion packet bytes this node relays per UTC day at most (0: none).
        onion_distinct_prefixes: never put two relays of one /24 (IPv4) or /48 (IPv6) on a
            path; turn off only where every relay shares one (a LAN, one host).
        onion_mean_delay_ms: the mean per-hop delay of ``ultra`` requests (exponential, drawn
            by the sender for every hop; at most 60,000 ms a hop).
        onion_cover_per_s: loop cover packets per second once this node made an ``ultra``
            request (a Poisson process; each costs one 2,421-byte packet per hop).
        device: when the device lends itself to work (the ``[device]`` table:
            :class:`~meshfed.device.config.DeviceConfig`); set in the file or as an object.
    """

    data_dir: Path = field(default_factory=default_data_dir)
    store_file: str = "store.sqlite3"
    transport: Literal["libp2p", "memory"] = "libp2p"
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    bootstrap: list[str] = field(default_factory=list)
    max_message_bytes: int = 4 * 1024 * 1024
    max_array_bytes: int = 8 * 1024**3
    array_chunk_bytes: int = 1024 * 1024
    replay_window_s: float = 120.0
    max_clock_skew_s: float = 10.0
    request_timeout_s: float = 10.0
    stop_timeout_s: float = 5.0
    ping_interval_s: float = 5.0
    max_streams_per_peer: int = 64
    requests_per_second: float = 1000.0
    request_burst: int = 2000
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    membership: bool = True
    roles: list[str] = field(default_factory=lambda: ["trainer"])
    gossip_interval_s: float = 1.0
    max_view: int = 0
    mdns: bool = True
    market: bool = True
    market_capacity: int = 1
    market_grant: float = 1000.0
    api: str = "127.0.0.1:0"
    relay_packets_per_s: float = 200.0
    relay_bytes_per_day: int = 10 * 1024**3
    onion_distinct_prefixes: bool = True
    onion_mean_delay_ms: float = 50.0
    onion_cover_per_s: float = 0.5
    device: DeviceConfig = field(default_factory=DeviceConfig)

    def __post_init__(self) -> None:
        positive = (
            "max_message_bytes",
            "max_array_bytes",
            "array_chunk_bytes",
            "replay_window_s",
            "request_timeout_s",
            "stop_timeout_s",
            "max_streams_per_peer",
            "requests_per_second",
            "request_burst",
            "gossip_interval_s",
            "relay_packets_per_s",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)!r}")
        for name in (
            "max_clock_skew_s",
            "ping_interval_s",
            "max_view",
            "market_capacity",
            "relay_bytes_per_day",
            "onion_cover_per_s",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.market_grant <= 9e9:
            raise ConfigError(
                f"market_grant: must be in [0, 2^53 / 1e6] credits, got {self.market_grant!r}"
            )
        if not 0 <= self.onion_mean_delay_ms <= 60_000:
            raise ConfigError(
                f"onion_mean_delay_ms: must be in [0, 60000], got {self.onion_mean_delay_ms!r}"
            )
        if self.max_message_bytes < 1024:
            raise ConfigError("max_message_bytes: must be at least 1024")
        if self.array_chunk_bytes > self.max_message_bytes:
            raise ConfigError(
                f"array_chunk_bytes ({self.array_chunk_bytes}) must not exceed "
                f"max_message_bytes ({self.max_message_bytes}): a chunk is one frame"
            )
        for addr in self.listen:
            _check_listen_addr(addr)
        if self.api != "off":
            api_address(self.api)
        for addr in self.bootstrap:
            if not addr.startswith("/"):
                raise ConfigError(f"bootstrap: {addr!r} is not a multiaddr (starts with '/')")
        known_roles = {"trainer", "inference", "relay", "client-only"}
        for role in self.roles:
            if role not in known_roles:
                raise ConfigError(f"roles: {role!r} is not one of {', '.join(sorted(known_roles))}")
        if "client-only" in self.roles and {"relay", "inference"} & set(self.roles):
            raise ConfigError("roles: a client-only node cannot relay or serve inference")
        for addr in self.bootstrap:
            if "/p2p/" not in addr:
                raise ConfigError(
                    f"bootstrap: {addr!r} has no /p2p/<peer id>; a bootstrap peer must be named"
                )

    @property
    def client_only(self) -> bool:
        """True for a node that cannot accept connections (behind NAT): it only dials out."""
        return "client-only" in self.roles

    @property
    def store_path(self) -> Path | None:
        """Where the store lives (None: no store)."""
        return self.data_dir / self.store_file if self.store_file else None

    @property
    def limits(self) -> TransportLimits:
        """The per-peer limits the transport enforces."""
        return TransportLimits(
            max_frame_bytes=self.max_message_bytes,
            max_streams_per_peer=self.max_streams_per_peer,
            requests_per_second=self.requests_per_second,
            request_burst=self.request_burst,
        )

    def to_toml(self) -> str:
        """Every key with its value, as a TOML file that :meth:`load` reads back."""
        flat = "".join(
            f"{f.name} = {_toml_value(getattr(self, f.name))}\n"
            for f in _FIELDS
            if f.name != "device"
        )
        return f"{flat}\n{self.device.to_toml()}"  # a table comes after the top-level keys

    @classmethod
    def load(
        cls,
        *,
        toml_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> NodeConfig:
        """Merge the sources, later winning: defaults, ``toml_path``, ``env``, ``overrides``.

        Args:
            toml_path: a TOML file of top-level keys (``listen = ["/ip4/..."]``).
            env: environment variables; only ``MESHFED_<KEY>`` ones are read (lists are
                comma-separated). Defaults to ``os.environ``.
            overrides: already-typed values, e.g. from command-line flags (``None`` = unset).

        Raises:
            ConfigError: naming the key, its source, and what is wrong.
        """
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        if toml_path is not None:
            try:
                document = tomllib.loads(toml_path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read config file {toml_path}: {exc}") from None
            for key, value in document.items():
                values[_known_key(key, f"file {toml_path}")] = value
                sources[key] = f"file {toml_path}"
        env = os.environ if env is None else env
        for name, raw in env.items():
            if name.startswith(ENV_PREFIX) and name not in _RESERVED_ENV:
                key = _known_key(name[len(ENV_PREFIX) :].lower(), f"env {name}")
                values[key] = _from_text(key, raw, f"env {name}")
                sources[key] = f"env {name}"
        for key, value in (overrides or {}).items():
            if value is not None:
                values[_known_key(key, "flags")] = value
                sources[key] = "flags"
        for key, value in values.items():
            values[key] = _check_type(key, value, sources[key])
        try:
            return cls(**values)
        except ConfigError as exc:
            key = str(exc).split(":", 1)[0]
            where = f" (from {sources[key]})" if key in sources else ""
            raise ConfigError(f"{key}{where}:{str(exc).split(':', 1)[1]}") from None


def api_address(text: str) -> tuple[str, int]:
    """``(host, port)`` of an ``api`` value: ``<ipv4>:<port>``, ``[<ipv6>]:<port>`` or
    ``localhost:<port>``.

    Raises:
        ConfigError: anything else (a host name other than localhost is refused: the API binds
            an address, and a name could resolve beyond loopback).
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"api: {text!r} is not <host>:<port> (or off)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"api: {host!r} is not an IP address (or localhost)") from None
    return host, int(port)


def api_on_loopback(host: str) -> bool:
    """Whether ``host`` (from :func:`api_address`) is a loopback address."""
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def _check_listen_addr(addr: str) -> None:
    """A listen address the node can serve: ``/ip4/<address>/tcp/<port>`` or
    ``/ip6/<address>/tcp/<port>`` (port 0: any free port). Anything else (no port, UDP/QUIC, a
    DNS name) would be dropped by the transport, leaving a node that nobody can reach."""
    accepted = "accepted: /ip4/<address>/tcp/<port> or /ip6/<address>/tcp/<port>"
    parts = addr.split("/")
    if len(parts) != 5 or parts[0] or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        raise ConfigError(f"listen: {addr!r} is not a TCP multiaddr with a port; {accepted}")
    kind = ipaddress.IPv4Address if parts[1] == "ip4" else ipaddress.IPv6Address
    try:
        kind(parts[2])
    except ValueError:
        raise ConfigError(f"listen: {addr!r}: {parts[2]!r} is not an {parts[1]} address") from None
    if not (parts[4].isascii() and parts[4].isdigit() and int(parts[4]) <= 65535):
        raise ConfigError(f"listen: {addr!r}: {parts[4]!r} is not a TCP port (0-65535)")


_HINTS = typing.get_type_hints(NodeConfig)
_FIELDS = dataclasses.fields(NodeConfig)
_KEYS = [f.name for f in _FIELDS]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def _known_key(key: str, source: str) -> str:
    if key in _HINTS:
        return key
    close = difflib.get_close_matches(key, _KEYS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(_KEYS)}"
    raise ConfigError(f"{key} (from {source}): unknown configuration key{hint}")


def _from_text(key: str, raw: str, source: str) -> Any:
    hint = _HINTS[key]
    try:
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if hint is Path:
            return Path(raw).expanduser()
        if hint is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if typing.get_origin(hint) is list:
            return [part.strip() for part in raw.split(",") if part.strip()]
    except ValueError:
        kind = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"{key} (from {source}): {raw!r} is not a valid {kind}") from None
    return raw


def _check_type(key: str, value: Any, source: str) -> Any:
    hint = _HINTS[key]
    origin = typing.get_origin(hint)
    where = f"{key} (from {source})"
    if hint is DeviceConfig:
        if isinstance(value, DeviceConfig):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a [device] table, got {value!r}")
        return DeviceConfig.from_mapping(value, source)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return list(value)
    if hint is Path:
        if not isinstance(value, str | Path):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value).expanduser()
    if hint is float and type(value) is int:
        return float(value)
    if type(value) is not hint:
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value

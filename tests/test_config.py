"""Configuration: file < env < flags, and errors that name the key, the source and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshfed.config import NodeConfig
from meshfed.errors import ConfigError


def test_sources_override_in_order(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(
        'listen = ["/ip4/127.0.0.1/tcp/5000"]\nping_interval_s = 2\nlog_level = "debug"\n'
    )
    env = {
        "MESHFED_PING_INTERVAL_S": "3.5",
        "MESHFED_BOOTSTRAP": "/ip4/1.2.3.4/tcp/1/p2p/x,/x/p2p/y",
    }
    cfg = NodeConfig.load(toml_path=toml, env=env, overrides={"log_level": "error", "listen": None})
    assert cfg.listen == ["/ip4/127.0.0.1/tcp/5000"]
    assert cfg.ping_interval_s == 3.5
    assert cfg.bootstrap == ["/ip4/1.2.3.4/tcp/1/p2p/x", "/x/p2p/y"]
    assert cfg.log_level == "error"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MESHFED_PING_INTERVL_S": "1"}, "did you mean 'ping_interval_s'"),
        ({"MESHFED_MAX_MESSAGE_BYTES": "lots"}, "env MESHFED_MAX_MESSAGE_BYTES.*not a valid int"),
        ({"MESHFED_TRANSPORT": "carrier-pigeon"}, "transport.*not one of 'libp2p', 'memory'"),
        ({"MESHFED_REQUEST_TIMEOUT_S": "-1"}, "request_timeout_s \\(from env .*must be > 0"),
        ({"MESHFED_BOOTSTRAP": "/ip4/1.2.3.4/tcp/1"}, "bootstrap.*no /p2p/<peer id>"),
        ({"MESHFED_ARRAY_CHUNK_BYTES": "99999999"}, "array_chunk_bytes.*must not exceed"),
    ],
)
def test_bad_values_name_key_source_and_reason(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NodeConfig.load(env=env)


def test_bad_file_types_are_reported(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text('listen = "/ip4/127.0.0.1/tcp/1"\n')
    with pytest.raises(ConfigError, match=f"listen \\(from file {toml}\\).*list of strings"):
        NodeConfig.load(toml_path=toml, env={})
    toml.write_text("listen = [")
    with pytest.raises(ConfigError, match="cannot read config file"):
        NodeConfig.load(toml_path=toml, env={})


def test_limits_follow_the_config() -> None:
    cfg = NodeConfig(max_message_bytes=2048, array_chunk_bytes=1024, max_streams_per_peer=3)
    assert cfg.limits.max_frame_bytes == 2048
    assert cfg.limits.max_streams_per_peer == 3


@pytest.mark.parametrize(
    "addr",
    [
        "/ip4/1.2.3.4",  # no port
        "/ip4/1.2.3.4/udp/4001/quic",  # not TCP
        "/dns4/example.com/tcp/4001",  # a name, not an address to bind
        "/ip4/1.2.3/tcp/4001",
        "/ip4/1.2.3.4/tcp/70000",
        "/ip4/1.2.3.4/tcp/4001/p2p/12D3KooWBmwXN3rs5bN6dw7RtZrxJtKB2W4ycQV4bFwBmTBuuRBa",
    ],
)
def test_a_listen_address_the_node_cannot_serve_is_refused(addr: str) -> None:
    with pytest.raises(ConfigError, match=r"listen \(from env MESHFED_LISTEN\): .*") as error:
        NodeConfig.load(env={"MESHFED_LISTEN": addr})
    assert addr in str(error.value)
    with pytest.raises(ConfigError, match=r"^listen: "):
        NodeConfig(listen=[addr])


def test_tcp_listen_addresses_are_accepted() -> None:
    addrs = ["/ip4/0.0.0.0/tcp/4001", "/ip6/::1/tcp/0", "/ip4/127.0.0.1/tcp/65535"]
    assert NodeConfig(listen=addrs).listen == addrs


def test_the_log_level_of_libraries_is_no_setting_and_no_error() -> None:
    """``MESHFED_LOG_LIBS`` is read by the logging set-up; the configuration leaves it alone."""
    config = NodeConfig.load(env={"MESHFED_LOG_LIBS": "debug", "MESHFED_SOAK": "1"})
    assert config == NodeConfig.load(env={})

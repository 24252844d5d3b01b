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

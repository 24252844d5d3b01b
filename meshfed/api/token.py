"""The API's bearer token: 32 random bytes, URL-safe base64, in ``<data_dir>/api.token``
(mode 0600), created at the node's first start and kept after."""

from __future__ import annotations

import base64
import os
import secrets
import stat
from pathlib import Path

from ..errors import ConfigError

__all__ = ["TOKEN_FILE", "load_or_create_token", "read_token"]

TOKEN_FILE = "api.token"


def read_token(data_dir: Path) -> str:
    """The token in ``data_dir``.

    Raises:
        ConfigError: missing, a symlink, readable by others, or not a token.
    """
    path = data_dir / TOKEN_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"cannot read the API token {path}: {exc}") from None
    with os.fdopen(fd, "rb") as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"{path} has mode {mode:o}: other users may have read the API token; "
                "delete the file (a new token is made at the node's next start)"
            )
        token = f.read(128).decode("ascii", "replace").strip()
    if len(token) != 43 or not all(c.isalnum() or c in "-_" for c in token):
        raise ConfigError(f"{path} does not hold an API token (delete it to have one made)")
    return token


def load_or_create_token(data_dir: Path) -> tuple[str, bool]:
    """``(token, created)``: the token in ``data_dir``, made first if there is none."""
    path = data_dir / TOKEN_FILE
    if path.exists() or path.is_symlink():
        return read_token(data_dir), False
    token = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot create the API token {path}: {exc}") from None
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    return token, True

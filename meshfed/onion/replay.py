"""The replay cache: every replay tag a node has peeled, by key epoch.

A Sphinx packet (or a SURB used twice) gives a hop the same shared secret, hence the same
replay tag, every time it arrives; the hop drops it the second time. Tags are recorded only
after the packet's MAC verified (nobody can fill the cache without building real packets for
this node), and forgotten when their epoch's key retires: a packet of a retired epoch is
dropped for its epoch, so its tag is no longer needed.

The driver persists each new tag (``Forward.replay_tag`` and friends) before acting on the
packet, and rebuilds the cache at start with :meth:`ReplayCache.restore` or
:meth:`ReplayCache.load`; a restarted node drops replays of what it processed before.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from ..errors import LocalProtocolError, StoreError
from .primitives import REPLAY_TAG_SIZE

__all__ = ["ReplayCache"]

_MAGIC = b"meshfed-replay-v1\n"
_COUNTS = struct.Struct(">II")


class ReplayCache:
    """Replay tags by epoch, bounded per epoch.

    Args:
        max_tags_per_epoch: beyond this, :meth:`add` refuses (the packet is dropped rather than
            a tag forgotten, which would let a replay through). A tag costs about 90 bytes of
            memory here and 16 in a dump; size it as the relay's packet rate cap times
            ``period + 2 * grace``.
    """

    def __init__(self, *, max_tags_per_epoch: int = 1_000_000) -> None:
        if max_tags_per_epoch < 1:
            raise LocalProtocolError(f"max_tags_per_epoch must be positive: {max_tags_per_epoch}")
        self.max_tags_per_epoch = max_tags_per_epoch
        self._tags: dict[int, set[bytes]] = {}

    def __contains__(self, item: tuple[int, bytes]) -> bool:
        epoch, tag = item
        return tag in self._tags.get(epoch, ())

    def __len__(self) -> int:
        return sum(len(tags) for tags in self._tags.values())

    @property
    def epochs(self) -> list[int]:
        """The epochs holding tags, oldest first."""
        return sorted(self._tags)

    def add(self, epoch: int, tag: bytes) -> bool:
        """Record ``tag``; False (and nothing recorded) if the epoch's cache is full.

        Raises:
            LocalProtocolError: ``tag`` is not a replay tag.
        """
        if len(tag) != REPLAY_TAG_SIZE:
            raise LocalProtocolError(f"a replay tag has {REPLAY_TAG_SIZE} bytes, not {len(tag)}")
        tags = self._tags.setdefault(epoch, set())
        if len(tags) >= self.max_tags_per_epoch and tag not in tags:
            return False
        tags.add(tag)
        return True

    def restore(self, epoch: int, tags: Iterable[bytes]) -> None:
        """Add stored tags of ``epoch`` (at start), beyond the bound if need be: a stored tag
        is never forgotten before its epoch retires.

        Raises:
            StoreError: a stored tag has the wrong length.
        """
        bucket = self._tags.setdefault(epoch, set())
        for tag in tags:
            if len(tag) != REPLAY_TAG_SIZE:
                raise StoreError(f"stored replay tag of epoch {epoch} has {len(tag)} bytes")
            bucket.add(tag)

    def retire(self, epochs: Iterable[int]) -> None:
        """Forget every tag of ``epochs`` (their keys are gone)."""
        for epoch in epochs:
            self._tags.pop(epoch, None)

    def dump(self) -> bytes:
        """The whole cache as bytes: a magic line, then per epoch ``epoch (u32 BE) || count
        (u32 BE) || count * 16-byte tags``, epochs ascending and tags sorted."""
        parts = [_MAGIC]
        for epoch in self.epochs:
            tags = sorted(self._tags[epoch])
            parts.append(_COUNTS.pack(epoch, len(tags)))
            parts.extend(tags)
        return b"".join(parts)

    @classmethod
    def load(cls, data: bytes, *, max_tags_per_epoch: int = 1_000_000) -> ReplayCache:
        """The cache :meth:`dump` wrote.

        Raises:
            StoreError: ``data`` is not a dump (truncated, wrong magic, trailing bytes).
        """
        if not data.startswith(_MAGIC):
            raise StoreError("not a replay cache dump (bad magic)")
        cache = cls(max_tags_per_epoch=max_tags_per_epoch)
        view = memoryview(data)
        at = len(_MAGIC)
        while at < len(data):
            if at + _COUNTS.size > len(data):
                raise StoreError("replay cache dump ends inside an epoch header")
            epoch, count = _COUNTS.unpack_from(view, at)
            at += _COUNTS.size
            end = at + count * REPLAY_TAG_SIZE
            if end > len(data):
                raise StoreError(f"replay cache dump ends inside epoch {epoch}'s tags")
            step = REPLAY_TAG_SIZE
            cache.restore(epoch, (data[i : i + step] for i in range(at, end, step)))
            at = end
        return cache

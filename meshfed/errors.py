"""Every exception meshfed raises.

The tree::

    MeshfedError
    ├── ConfigError            a configuration key is missing, malformed or out of range
    │   └── DataError            a data set cannot be registered or loaded (names file, problem)
    ├── IdentityError          the key files are unreadable, world-readable or corrupt
    ├── StoreError             the node's store cannot be opened or used
    │   └── CorruptRecord        a stored row fails its integrity check: never loaded
    ├── ProtocolError
    │   ├── LocalProtocolError   we were asked to do something illegal (a bug in the caller)
    │   └── RemoteProtocolError  a peer sent something we reject; carries the counted reason
    ├── MarketError            a job cannot be bought as asked; says why
    │   ├── NoMatchingPeers      no peer's record meets the requirements (counts per requirement)
    │   ├── NoBids               too few bids before the deadline
    │   ├── BudgetTooLow         the budget is below the price estimate (carries the estimate)
    │   ├── BudgetExceeded       an award or a debit would spend beyond the budget
    │   └── NotAwarded           a lease or debit from a peer that holds no award
    └── TransportError
        ├── PeerUnreachable      no route to the peer, or it refused us
        ├── StreamClosed         the other end closed (or reset) the stream
        ├── RequestTimeout       no answer before the caller's deadline
        └── RequestFailed        the peer answered a request with an error

As in h11, cores raise ``LocalProtocolError`` internally and the receive path turns
what came from a peer into ``RemoteProtocolError``. Exceptions of the libp2p library never
leak out of ``meshfed.transports``: they are mapped to ``TransportError`` there.
"""

from __future__ import annotations

from .stats import RejectReason

__all__ = [
    "BudgetExceeded",
    "BudgetTooLow",
    "ConfigError",
    "CorruptRecord",
    "DataError",
    "IdentityError",
    "LocalProtocolError",
    "MarketError",
    "MeshfedError",
    "NoBids",
    "NoMatchingPeers",
    "NotAwarded",
    "PeerUnreachable",
    "ProtocolError",
    "RemoteProtocolError",
    "RequestFailed",
    "RequestTimeout",
    "StoreError",
    "StreamClosed",
    "TransportError",
    "leaves",
]


class MeshfedError(Exception):
    """Base class of every error meshfed raises on purpose."""


class ConfigError(MeshfedError, ValueError):
    """A configuration value is wrong; the message names the key and says why."""


class DataError(ConfigError):
    """A data set is refused (wrong shape, bad labels, NaN, a corrupt or changed file ...);
    the message names the file (or the data set) and the problem."""


class IdentityError(MeshfedError):
    """The node identity cannot be loaded or created safely."""


class StoreError(MeshfedError):
    """The node's store cannot be opened (unreadable, or written by a newer meshfed) or used."""


class CorruptRecord(StoreError):
    """A stored row does not match its HMAC: it is reported, never loaded."""


class ProtocolError(MeshfedError):
    """Something broke the rules of a meshfed protocol."""


class LocalProtocolError(ProtocolError):
    """Our side asked for something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """A peer sent something we reject.

    Args:
        message: what was wrong, for logs.
        reason: the counted reject reason (see :class:`meshfed.stats.RejectReason`).
    """

    def __init__(self, message: str, *, reason: RejectReason) -> None:
        super().__init__(message)
        self.reason = reason


class TransportError(MeshfedError):
    """The transport could not carry a message."""


class PeerUnreachable(TransportError):
    """The peer cannot be reached (not dialable, crashed, partitioned or refusing)."""


class StreamClosed(TransportError):
    """The stream ended: the other side closed or reset it, or the node is stopping."""


class RequestTimeout(TransportError):
    """No answer came before the deadline (the request may still have reached the peer)."""


class RequestFailed(TransportError):
    """The peer received the request and answered with an error.

    Args:
        message: the peer's explanation.
        reason: the peer's short reason code (for example ``"unknown_protocol"``).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class MarketError(MeshfedError):
    """A job cannot be bought, awarded, leased or paid as asked; the message says why."""


class NoMatchingPeers(MarketError):
    """No known peer meets the job's requirements.

    Args:
        message: what was asked.
        excluded: for each requirement, how many known peers it excluded.
    """

    def __init__(self, message: str, *, excluded: dict[str, int]) -> None:
        detail = ", ".join(f"{name}: {count}" for name, count in sorted(excluded.items()))
        super().__init__(f"{message} (excluded by {detail})" if detail else message)
        self.excluded = dict(excluded)


class NoBids(MarketError):
    """Fewer acceptable bids than the job needs arrived before the bid deadline."""


class BudgetTooLow(MarketError):
    """The budget is below what the job is estimated to cost.

    Args:
        message: what was asked.
        estimate: the estimated price in micro-credits.
        breakdown: how the estimate was made (per-unit price, units, discounts).
    """

    def __init__(self, message: str, *, estimate: int, breakdown: dict[str, object]) -> None:
        super().__init__(message)
        self.estimate = estimate
        self.breakdown = dict(breakdown)


class BudgetExceeded(MarketError):
    """An award, a replacement or a debit would spend beyond the job's budget."""


class NotAwarded(MarketError):
    """A peer offered a lease or a debit for a job it holds no award in."""


def leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside ``error``, however deeply exception groups nest them."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]

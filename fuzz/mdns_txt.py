"""Harness: :func:`meshfed.membership.mdns.parse_txt`, the raw TXT record of any mDNS
announcement on the LAN (unauthenticated by nature).

It must never raise and only return ``/...`` multiaddrs with ``/p2p/``; what
:func:`~meshfed.membership.mdns.txt_for` writes must parse back to the same addresses.
"""

from __future__ import annotations

from collections.abc import Iterator

from meshfed.membership.mdns import parse_txt, txt_for

from ._common import IDENTITIES, Reader, Writer


def test_one_input(data: bytes) -> None:
    """A raw TXT record; then the addresses it held, written and parsed again."""
    addrs = parse_txt(Reader(data).rest())
    for addr in addrs:
        if not (isinstance(addr, str) and addr.startswith("/") and "/p2p/" in addr):
            raise AssertionError(f"parse_txt returned {addr!r}")
    if not all(len(f"dnsaddr={addr}".encode()) < 256 for addr in addrs):
        return  # txt_for leaves out what a TXT string cannot hold
    if parse_txt(txt_for(addrs)) != addrs:
        raise AssertionError("txt_for and parse_txt do not agree")


def seeds() -> Iterator[bytes]:
    """Records as meshfed and other libp2p implementations write them."""
    peer = IDENTITIES[0].peer_id
    yield Writer().raw(txt_for([f"/ip4/192.168.1.2/tcp/4001/p2p/{peer}"])).build()
    yield (
        Writer()
        .raw(
            txt_for([f"/ip6/::1/tcp/4001/p2p/{peer}", f"/ip4/10.0.0.1/udp/4001/quic-v1/p2p/{peer}"])
            + b"\x05other"
        )
        .build()
    )
    yield Writer().raw(b"\x00\x09dnsaddr=/\xff").build()

"""Announce one libp2p peer by mDNS the way js-libp2p does: a PTR record and TXT ``dnsaddr=``
records, no SRV and no A/AAAA (for tests; run inside a network namespace).

Usage: ``python tests/membership/announce_ptr_txt.py MULTIADDR [SECONDS]``. Sends the
announcement every half second until SECONDS (20) have passed.
"""

from __future__ import annotations

import secrets
import sys
import time

from zeroconf import IPVersion, Zeroconf
from zeroconf._dns import DNSPointer, DNSText
from zeroconf._protocol.outgoing import DNSOutgoing

from meshfed.membership.mdns import SERVICE_TYPE, txt_for

_TYPE_PTR, _TYPE_TXT, _CLASS_IN, _UNIQUE = 12, 16, 1, 0x8000
_RESPONSE = 0x8400  # QR | AA


def main(addr: str, seconds: float) -> None:
    instance = f"{secrets.token_hex(16)}.{SERVICE_TYPE}"
    zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    try:
        ends = time.monotonic() + seconds
        while time.monotonic() < ends:
            out = DNSOutgoing(_RESPONSE)
            out.add_answer_at_time(DNSPointer(SERVICE_TYPE, _TYPE_PTR, _CLASS_IN, 120, instance), 0)
            text = DNSText(instance, _TYPE_TXT, _CLASS_IN | _UNIQUE, 120, txt_for([addr]))
            out.add_answer_at_time(text, 0)
            zc.send(out)
            time.sleep(0.5)
    finally:
        zc.close()


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 20.0)

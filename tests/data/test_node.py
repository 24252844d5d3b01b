"""A node's data sets in its signed record: offered by name, count, shape and label digest,
re-signed when they change, read from the store at start; never their content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trio

from meshfed.membership.records import DatasetOffer
from meshfed.node import Node
from meshfed.testing import open_memory_mesh
from tests.membership.test_service import eventually


def own_offers(node: Node) -> list[DatasetOffer]:
    assert node.membership is not None
    record = node.membership.table.get(node.peer_id)
    assert record is not None
    return record.capabilities.datasets


async def test_the_record_offers_the_data_sets_and_never_their_content(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.random((300, 8, 8), dtype=np.float32), rng.integers(0, 7, 300)
    async with open_memory_mesh(2, tmp_path, membership=True, gossip_interval_s=0.1) as nodes:
        a, b = nodes
        assert a.datasets is not None and a.membership is not None
        assert own_offers(a) == []
        a.datasets.register("clinic", (x, y), classes=10)
        await trio.to_thread.run_sync(a.datasets.register, "small", (x[:20], y[:20]))
        [clinic, small] = own_offers(a)  # re-signed after each change, from either thread
        assert (clinic.name, clinic.examples, clinic.feature_shape) == ("clinic", 300, [8, 8])
        assert clinic.classes == 10 and clinic.label_digest != bytes(32)
        assert (small.examples, small.classes) == (20, max(y[:20]) + 1)
        signed = a.membership.table.signed(a.peer_id)
        assert signed is not None and signed.verify().capabilities.datasets == [clinic, small]
        assert len(signed.record) < 1024  # 300 examples of 64 floats are 76,800 bytes
        for example in x[:20]:
            assert example.tobytes()[:16] not in signed.record
        # the others learn the offer by gossip and can look for it
        await b.connect(a.listen_addrs[0])
        await eventually(lambda: bool(b.peers(dataset="clinic")), within=20, what="the offer")
        [seen] = b.peers(dataset="clinic")
        assert seen.peer == a.peer_id and seen.capabilities.datasets[0] == clinic
        a.datasets.remove("clinic")
        assert [offer.name for offer in own_offers(a)] == ["small"]
    async with open_memory_mesh(1, tmp_path, membership=True) as [again]:  # node 0, restarted
        assert [offer.name for offer in own_offers(again)] == ["small"]

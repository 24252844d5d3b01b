"""The replay cache: its serialised form, its bound, and forgetting retired epochs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshfed.errors import LocalProtocolError, StoreError
from meshfed.onion import ReplayCache

tags = st.binary(min_size=16, max_size=16)


@given(st.dictionaries(st.integers(0, 2**32 - 1), st.sets(tags, max_size=5), max_size=4))
def test_a_dumped_cache_loads_to_the_same_tags(content: dict[int, set[bytes]]) -> None:
    cache = ReplayCache()
    for epoch, epoch_tags in content.items():
        for tag in epoch_tags:
            assert cache.add(epoch, tag)
    loaded = ReplayCache.load(cache.dump())
    assert loaded.dump() == cache.dump()
    assert len(loaded) == sum(len(t) for t in content.values())
    for epoch, epoch_tags in content.items():
        assert all((epoch, tag) in loaded for tag in epoch_tags)


@pytest.mark.parametrize("cut", [1, 5, 17])
def test_a_truncated_or_foreign_dump_is_a_store_error(cut: int) -> None:
    cache = ReplayCache()
    cache.add(1, b"t" * 16)
    with pytest.raises(StoreError):
        ReplayCache.load(cache.dump()[:-cut])
    with pytest.raises(StoreError):
        ReplayCache.load(b"not a dump")


def test_the_cache_refuses_beyond_its_bound_and_forgets_retired_epochs() -> None:
    cache = ReplayCache(max_tags_per_epoch=1)
    assert cache.add(1, b"a" * 16)
    assert cache.add(1, b"a" * 16)  # already there: no room needed
    assert not cache.add(1, b"b" * 16)
    assert cache.add(2, b"b" * 16)
    cache.retire([1])
    assert cache.epochs == [2]
    assert (1, b"a" * 16) not in cache
    with pytest.raises(LocalProtocolError):
        cache.add(2, b"short")

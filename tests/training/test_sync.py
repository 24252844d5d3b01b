"""The training state a peer catching up receives: it round-trips, and junk is refused."""

from __future__ import annotations

import tracemalloc

import msgpack
import numpy as np
import pytest

from meshfed.errors import RemoteProtocolError
from meshfed.stats import RejectReason
from meshfed.training.strategies import named
from meshfed.training.sync import TrainingState, decode_state, encode_state


def test_a_state_with_an_optimizer_state_round_trips() -> None:
    strategy = named("fedadam")
    base = np.zeros(5, np.float32)
    strategy.apply(base, base + 1)
    state = TrainingState(3, np.arange(5, dtype=np.float32), strategy.state_dict())
    back = decode_state(encode_state(state), parameters=5)
    assert back.next_round == 3
    np.testing.assert_array_equal(back.model, state.model)
    restored = named("fedadam")
    restored.load_state_dict(back.strategy)
    np.testing.assert_array_equal(restored.apply(base, base), strategy.apply(base, base))


@pytest.mark.parametrize(
    "array",
    [
        np.zeros(7, np.uint8),  # not msgpack of a state
        np.zeros(3, np.float32),  # not bytes
        encode_state(TrainingState(1, np.zeros(4, np.float32), {})),  # another model's size
        encode_state(TrainingState(1, np.full(5, np.nan, np.float32), {})),  # not finite
    ],
)
def test_what_is_not_a_state_of_this_model_is_a_bad_array(array: np.ndarray) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        decode_state(array, parameters=5)
    assert caught.value.reason is RejectReason.BAD_ARRAY


_EMPTY_ARRAYS = b"\xdd" + (1 << 20).to_bytes(4, "big") + b"\x90" * (1 << 20)  # 1 MiB of []


@pytest.mark.parametrize("where", ["state", "strategy"])
def test_a_hostile_state_is_refused_before_it_is_built(where: str) -> None:
    """A megabyte of empty arrays would be a million Python lists (~60 MB) if parsed whole."""
    model = np.zeros(5, "<f4").tobytes()
    packed = _EMPTY_ARRAYS if where == "state" else msgpack.packb([1, model, _EMPTY_ARRAYS])
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError) as caught:
            decode_state(np.frombuffer(packed, np.uint8), parameters=5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert caught.value.reason is RejectReason.BAD_ARRAY
    assert peak < 4 * len(packed), peak

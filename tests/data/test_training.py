"""A job on the peers' own data sets: each trains on its registered copy, evaluates on the part
it holds out, and the roster's example-weighted accuracy comes from counts no peer reveals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from meshfed.errors import ConfigError, DataError
from meshfed.secagg.driver import Aggregator
from meshfed.testing import open_memory_mesh
from meshfed.training.data import OwnData, load_dataset, partition
from meshfed.training.job import TrainingPeer
from meshfed.training.spec import AveragingSpec, DataSpec, JobSpec, TrainingSpec
from meshfed.training.torch_adapter import evaluate, load_flat
from tests.training.nodes import QUICK, run_together


def shards(peers: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Different, unequal shards of digits (quantity skew), one per peer."""
    train, _ = load_dataset("digits")
    parts = partition(train.y, peers, scheme="quantity", alpha=2.0, seed=5)
    return [(train.x[p], train.y[p]) for p in parts]


@pytest.mark.parametrize("secure", [True, False])
async def test_each_peer_trains_on_its_own_data_and_the_pooled_accuracy_is_example_weighted(
    tmp_path: Path, secure: bool
) -> None:
    mine = shards(4)
    async with open_memory_mesh(4, tmp_path) as nodes:
        for node, (x, y) in zip(nodes, mine, strict=True):
            assert node.datasets is not None
            node.datasets.register("clinic", (x, y), classes=10)
        spec = JobSpec(
            job_id=f"own-{secure}",
            roster=tuple(str(node.peer_id) for node in nodes),
            data=DataSpec(
                dataset="clinic", own_data=OwnData(max_examples=max(len(y) for _, y in mine))
            ),
            rounds=3,
            training=TrainingSpec(epochs=2),
            averaging=AveragingSpec(secure=secure),
        )
        peers = [
            TrainingPeer(node, spec, Aggregator(node, deadlines=QUICK), store=node.store)
            for node in nodes
        ]
        reports = await run_together(peers)
    # each trained on its own registered examples, less the 20% it held out
    for peer, (_, y) in zip(peers, mine, strict=True):
        assert len(peer.shard) + len(peer.test) == len(y)
        assert len(peer.test) == round(0.2 * len(y))
        # weighed by its training examples, against the largest offer (so below 1)
        assert peer.weight == len(peer.shard) / spec.data.own_data.max_examples < 1
    for number in range(spec.rounds):
        latest = [mine[number] for mine in reports]
        # the same model everywhere (exact schedule), evaluated on each peer's own part ...
        correct = sum(round(r.accuracy * len(p.test)) for r, p in zip(latest, peers, strict=True))
        expected = correct / sum(len(p.test) for p in peers)
        for report in latest:  # ... and the pooled accuracy is their example-weighted mean
            assert report.pooled_peers == 4
            assert report.pooled_examples == sum(len(p.test) for p in peers)
            assert report.pooled_accuracy is not None
            assert report.pooled_accuracy == expected
    assert reports[0][-1].pooled_accuracy > reports[0][0].pooled_accuracy - 0.05
    assert reports[0][-1].pooled_accuracy > 0.6
    # the report's accuracy is the peer's own validation part, recomputed from the model
    model = peers[0].model
    load_flat(model, peers[0].parameters)
    _, accuracy = evaluate(model, peers[0].test.x, peers[0].test.y)
    assert accuracy == reports[0][-1].accuracy


async def test_a_job_on_a_data_set_a_peer_has_not_registered_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    async with open_memory_mesh(4, tmp_path) as nodes:
        spec = JobSpec(
            job_id="missing",
            roster=tuple(str(n.peer_id) for n in nodes),
            data=DataSpec(dataset="clinic"),
        )
        with pytest.raises(DataError, match="job 'missing': dataset: no data set 'clinic' on"):
            TrainingPeer(nodes[0], spec, store=nodes[0].store)


async def test_a_registered_file_changed_since_registration_is_refused_at_job_start(
    tmp_path: Path,
) -> None:
    (x, y), *_ = shards(4)
    path = tmp_path / "mine.npz"
    np.savez(path, x=x, y=y)
    async with open_memory_mesh(4, tmp_path) as nodes:
        assert nodes[0].datasets is not None
        nodes[0].datasets.register("clinic", path)
        np.savez(path, x=x, y=np.roll(y, 1))  # someone changes the file afterwards
        spec = JobSpec(
            job_id="changed",
            roster=tuple(str(n.peer_id) for n in nodes),
            data=DataSpec(dataset="clinic"),
        )
        with pytest.raises(DataError, match=f"dataset: {path}: changed since it was registered"):
            TrainingPeer(nodes[0], spec, store=nodes[0].store)


def test_own_data_options_are_for_registered_data_sets_only() -> None:
    from meshfed.identity import Identity

    roster = tuple(str(Identity.generate().peer_id) for _ in range(4))
    with pytest.raises(ConfigError, match="own_data is for data sets the peers registered"):
        DataSpec(own_data=OwnData(validation=0.3))
    with pytest.raises(ConfigError, match=r"own_data.validation must be in \(0, 1\)"):
        DataSpec(dataset="clinic", own_data=OwnData(validation=1.0))
    clinic = DataSpec(dataset="clinic", own_data=OwnData(max_examples=400))
    spec = JobSpec(job_id="j", roster=roster, data=clinic)
    assert JobSpec.from_json(spec.to_json()) == spec  # a job file carries it as a table
    with pytest.raises(ConfigError, match=r"own_data\.valdation: unknown job field"):
        JobSpec.from_json(spec.to_json().replace('"validation"', '"valdation"'))

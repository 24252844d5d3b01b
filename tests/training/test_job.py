"""Decentralized training over real nodes: every peer ends each round with the same model."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfed.errors import ConfigError
from meshfed.identity import Identity
from meshfed.secagg.driver import Aggregator, DeadlinePolicy
from meshfed.training.data import OwnData
from meshfed.training.job import RoundReport, TrainingPeer
from meshfed.training.spec import (
    GROUPS,
    AveragingSpec,
    DataSpec,
    JobSpec,
    RobustnessSpec,
    TrainingSpec,
)
from tests.training.nodes import job_for, memory_nodes, peers_for, run_together


@pytest.mark.parametrize("secure", [True, False])
async def test_peers_train_digits_together_and_hold_the_same_model(
    tmp_path: Path, secure: bool
) -> None:
    async with memory_nodes(tmp_path, 4) as nodes:
        spec = job_for(
            nodes,
            f"digits-{secure}",
            rounds=6,
            epochs=2,
            secure=secure,
            partition="dirichlet",
            alpha=0.5,
        )
        peers = peers_for(nodes, spec)
        reports = await run_together(peers)
        first = peers[0].parameters
        for peer in peers[1:]:
            np.testing.assert_array_equal(peer.parameters, first)
        for peer_reports in reports:
            assert [r.round for r in peer_reports] == list(range(6))
            assert all(r.groups == (4,) for r in peer_reports)
            assert peer_reports[-1].accuracy > 0.85
            assert peer_reports[-1].accuracy > peer_reports[0].accuracy - 0.05


def test_a_job_refuses_what_cannot_run() -> None:
    roster = tuple(str(Identity.generate().peer_id) for _ in range(4))
    with pytest.raises(ConfigError, match="schedule"):
        AveragingSpec(schedule="sometimes")
    with pytest.raises(ConfigError, match="roster"):
        JobSpec(job_id="j", roster=roster[:1])
    with pytest.raises(ConfigError, match="roster: required"):
        JobSpec.from_json('{"job_id": "j"}')
    with pytest.raises(ConfigError, match="groups of 4 or more"):
        JobSpec(job_id="j", roster=roster[:3])  # secure: a colluder could read one model
    JobSpec(job_id="j", roster=roster[:3], averaging=AveragingSpec(secure=False))
    mlp = TrainingSpec(model="mlp", model_options={"hidden": [32]})
    spec = JobSpec(job_id="j", roster=roster, training=mlp)
    assert JobSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("secure", [False, True])
async def test_a_peer_that_starts_late_takes_the_others_state_and_ends_with_their_model(
    tmp_path: Path, secure: bool
) -> None:
    async with memory_nodes(tmp_path, 5) as nodes:
        spec = job_for(
            nodes,
            f"late-{secure}",
            rounds=16,
            epochs=3,
            secure=secure,
            partition="iid",
        )
        deadlines = DeadlinePolicy(join_s=1.0, grace_s=0.3, phase_max_s=3.0)
        # a peer alone in its round (the others are elsewhere) gives up after phase_max_s
        alone = replace(deadlines, phase_max_s=0.5)
        peers = [
            TrainingPeer(node, spec, Aggregator(node, deadlines=alone if i == 4 else deadlines))
            for i, node in enumerate(nodes)
        ]
        reports: list[list[RoundReport]] = [[] for _ in nodes]
        others_in_round_2 = trio.Event()

        def early(i: int) -> Callable[[RoundReport], None]:
            def seen(report: RoundReport) -> None:
                reports[i].append(report)
                if report.round == 1:
                    others_in_round_2.set()

            return seen

        async def late() -> None:
            await others_in_round_2.wait()
            reports[4].extend(await peers[4].run())

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(peers[i].run, early(i))
            nursery.start_soon(late)
        # the others went on without it (a group without its absent member), never failing
        for peer_reports in reports[:4]:
            assert [r.round for r in peer_reports] == list(range(16))
            assert all(any(r.groups) for r in peer_reports)
        late_rounds = [r.round for r in reports[4]]
        # alone in round 0 (nobody else was there), it took the state the others ended a later
        # round with (they had ended round 1 when it started): its first report is of that
        # round, with their model
        first = reports[4][0]
        assert first.round >= 1 and not any(first.groups)
        assert first.model_digest == reports[0][first.round].model_digest
        assert late_rounds == sorted(set(late_rounds))
        assert reports[4][-1].groups == (5,)  # and trained with the others at the end
        for peer in peers[1:]:
            np.testing.assert_array_equal(peer.parameters, peers[0].parameters)


async def test_under_secure_aggregation_a_peer_sums_its_own_model_with_three_others_at_least(
    tmp_path: Path,
) -> None:
    async with memory_nodes(tmp_path, 8) as nodes:
        # 8 peers in groups of at most 4: groups of 4 first, then pairs of group means
        spec = job_for(nodes, "groups", rounds=1, max_group=4)
        peers = peers_for(nodes, spec)
        reports = await run_together(peers)
        for peer_reports in reports:
            step_0, step_1 = peer_reports[0].groups
            assert step_0 == 4  # one colluder among them never reads one honest model
            assert step_1 == 2  # a pair sums two aggregates of 4, never a peer's own model
        assert len({report[-1].accuracy for report in reports}) == 1  # the exact mean
    with pytest.raises(ConfigError, match="groups of 4 or more"):
        JobSpec(job_id="j", roster=spec.roster[:7], averaging=AveragingSpec(max_group=3))


async def test_pushsum_gossip_brings_every_peer_close_to_the_same_model(tmp_path: Path) -> None:
    async with memory_nodes(tmp_path, 5) as nodes:
        spec = job_for(
            nodes,
            "gossip",
            rounds=12,
            epochs=1,
            schedule="pushsum",
            secure=False,
            partition="iid",
        )
        peers = peers_for(nodes, spec)
        reports = await run_together(peers)
        finals = [r[-1].accuracy for r in reports]
        assert min(finals) > 0.85 and max(finals) - min(finals) < 0.05
        # ceil(log2 5) = 3 pushes per tick, each to a different peer; after the last tick,
        # 3 more ticks of mixing alone
        assert all(r.groups == (3,) for peer_reports in reports for r in peer_reports[:-1])
        assert all(peer_reports[-1].groups == (12,) for peer_reports in reports)
        # the gossip conserves mass: the weights still sum to the number of peers
        waiting = sum(float(m[-1]) for peer in peers for m in peer._pushes)
        total = sum(peer._push_state.weight for peer in peers) + waiting
        assert total == pytest.approx(5.0)


async def test_pushsum_peers_wait_for_a_slow_pusher_instead_of_running_ahead(
    tmp_path: Path,
) -> None:
    async with memory_nodes(tmp_path, 4) as nodes:
        spec = job_for(
            nodes,
            "slow",
            rounds=10,
            epochs=1,
            local_steps=1,
            schedule="pushsum",
            secure=False,
            partition="dirichlet",
        )
        peers = peers_for(nodes, spec)
        slow = peers[0]
        train = slow._train_locally

        async def slowly(number: int) -> float:
            await trio.sleep(0.1)
            return await train(number)

        slow._train_locally = slowly  # type: ignore[method-assign]
        done: dict[tuple[int, int], float] = {}
        async with trio.open_nursery() as nursery:
            for i, peer in enumerate(peers):

                def note(report: RoundReport, i: int = i) -> None:
                    done[i, report.round] = trio.current_time()

                nursery.start_soon(peer.run, note)
        # nobody got more than the staleness bound (+ one sweep's slack) ahead of the slow peer
        for i in range(1, 4):
            for tick in range(spec.rounds - 4):
                assert done[i, tick + 4] > done[0, tick]
        assert not any(peer._gone for peer in peers)  # slow is not gone


def _roster(n: int = 4) -> list[str]:
    return [str(Identity.generate().peer_id) for _ in range(n)]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"epoch": 2}, "epoch: unknown job field; did you mean 'epochs'?"),
        ({"rounds": "3"}, "rounds: expected an integer, got '3'"),
        ({"secure": "yes"}, "secure: expected true or false, got 'yes'"),
        ({"lr": "0.1"}, "lr: expected a number, got '0.1'"),
        ({"rounds": True}, "rounds: expected an integer, got True"),
        ({"roster": [1, 2, 3]}, "roster: expected a list of strings"),
        ({"model_options": [64]}, "model_options: expected a table"),
        ({"job_id": None}, "job_id: expected a string, got None"),
        ({"optimizer": "adamw"}, "optimizer: must be sgd or adam"),
    ],
)
def test_a_job_file_with_a_bad_field_is_refused_naming_it(
    tmp_path: Path, fields: dict[str, object], message: str
) -> None:
    import json

    job = tmp_path / "job.json"
    job.write_text(json.dumps({"job_id": "j", "roster": _roster(), **fields}))
    with pytest.raises(ConfigError) as refused:
        JobSpec.from_file(job)
    assert str(refused.value).startswith(f"job file {job}: ")
    assert message in str(refused.value)


def test_a_job_file_states_the_required_fields_and_reads_toml(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text("rounds = 3\n")
    with pytest.raises(ConfigError, match="job_id, roster: required"):
        JobSpec.from_file(job)
    job.write_text(f'job_id = "j"\nroster = {_roster()!r}\nrounds = 3\nalpha = 1\n')
    spec = JobSpec.from_file(job)
    assert (spec.rounds, spec.data.alpha, type(spec.data.alpha)) == (3, 1.0, float)
    job.write_text("rounds = [")
    with pytest.raises(ConfigError, match=f"cannot read job file {job}"):
        JobSpec.from_file(job)


def test_a_job_built_in_python_is_type_checked_too() -> None:
    with pytest.raises(ConfigError, match="rounds: expected an integer, got '3'"):
        JobSpec(job_id="j", roster=tuple(_roster()), rounds="3")  # type: ignore[arg-type]
    attacked = RobustnessSpec(attackers=[0])  # type: ignore[arg-type]
    spec = JobSpec(job_id="j", roster=_roster(), robustness=attacked)  # type: ignore[arg-type]
    assert isinstance(spec.roster, tuple) and spec.robustness.attackers == (0,)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model_options": {"inputs": 3}}, r"model, model_options: mlp .* 64 features"),
        ({"model": "cifar_cnn"}, r"model, model_options: cifar_cnn .* not fit .*'digits'"),
        ({"model_options": {"classes": 5}}, r"model_options: .* needs \(32, 10\)"),
        (
            {"model_options": {"input": 64}},
            "model_options: .* no option 'input'; did you mean 'inputs'",
        ),
        ({"model": "transformer"}, "model: no model 'transformer'; known: cifar_cnn, cnn"),
        ({"algorithm": "adam"}, "algorithm: no strategy 'adam'; known: fedavg"),
        ({"dataset": "mnist"}, "dataset: no data set 'mnist'"),
    ],
)
async def test_a_model_that_does_not_fit_the_data_is_refused_before_any_training(
    tmp_path: Path, options: dict[str, object], message: str
) -> None:
    async with memory_nodes(tmp_path, 4) as nodes:
        spec = job_for(nodes, "misfit", **options)
        for node in nodes:
            with pytest.raises(ConfigError, match=message):
                TrainingPeer(node, spec)


def test_too_many_peers_for_the_data_are_refused_saying_how_many_it_feeds() -> None:
    from meshfed.training.preflight import prepare

    data = DataSpec(partition="dirichlet", alpha=0.5)
    spec = JobSpec(job_id="j", roster=tuple(_roster(400)), data=data)
    with pytest.raises(ConfigError, match=r"partition: .* digits .* feeds about \d+ peers"):
        prepare(spec)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=5,
)
_ROSTER = _roster()


#: every key of the flat form: (its group or None at the top, its field)
_FLAT_KEYS = {
    **{f.name: (None, f) for f in dataclasses.fields(JobSpec) if f.name not in GROUPS},
    **{f.name: (key, f) for key, group in GROUPS.items() for f in dataclasses.fields(group)},
}


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(_FLAT_KEYS)), _JSON_VALUES))
def test_any_json_job_is_a_well_typed_job_or_a_config_error(fields: dict[str, object]) -> None:
    import json

    document = {"job_id": "j", "roster": _ROSTER, **fields}
    try:
        spec = JobSpec.from_json(json.dumps(document))
    except ConfigError:
        return  # refused (never another exception: a TypeError, an AttributeError ...)
    assert JobSpec.from_json(spec.to_json()) == spec
    for name, value in fields.items():  # what was accepted has its declared type
        group, declared = _FLAT_KEYS[name]
        kept = getattr(spec if group is None else getattr(spec, group), name)
        if isinstance(kept, OwnData):  # own_data: a table
            assert isinstance(value, dict) and kept == OwnData(**value)
            continue
        assert kept == value or (isinstance(kept, tuple) and list(kept) == value)
        assert type(kept) is type(declared.default) or name in (
            "job_id", "roster", "model_options", "algorithm_options", "robust_options",
        )  # fmt: skip

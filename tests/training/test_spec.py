"""A job spec, grouped by concern: each group checks its own fields, and a job document is read
the same whether its fields are grouped, flat (the form before the groups) or both."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from meshfed.errors import ConfigError
from meshfed.identity import Identity
from meshfed.training.data import OwnData
from meshfed.training.spec import (
    GROUPS,
    AveragingSpec,
    DataSpec,
    JobSpec,
    PrivacySpec,
    ProgressSpec,
    RobustnessSpec,
    TrainingSpec,
    flattened,
    grouped,
)

ROSTER = [str(Identity.generate().peer_id) for _ in range(8)]

#: values each flat key may take in the round trip (valid alone; some pairs are refused)
_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "rounds": st.integers(1, 100),
    "dataset": st.sampled_from(["digits", "synthetic", "clinic"]),
    "partition": st.sampled_from(["iid", "dirichlet", "quantity"]),
    "alpha": st.floats(0.01, 10),
    "model": st.sampled_from(["mlp", "cnn"]),
    "model_options": st.fixed_dictionaries({}, optional={"hidden": st.just([16])}),
    "epochs": st.integers(1, 5),
    "local_steps": st.integers(0, 5),
    "batch_size": st.integers(1, 256),
    "lr": st.floats(0.001, 1),
    "optimizer": st.sampled_from(["sgd", "adam"]),
    "algorithm": st.sampled_from(["fedavg", "fedprox"]),
    "seed": st.integers(0, 2**31),
    "secure": st.booleans(),
    "collusion": st.integers(0, 2),
    "schedule": st.sampled_from(["exact", "moshpit", "pushsum"]),
    "max_group": st.integers(2, 128),
    "clip": st.floats(0.1, 64),
    "levels_bits": st.integers(8, 20),
    "gossip_pushes": st.integers(0, 4),
    "gossip_staleness": st.integers(1, 4),
    "compression": st.sampled_from(["none", "fp16", "int8", "topk"]),
    "topk_ratio": st.floats(0.001, 1),
    "dp_clip": st.sampled_from([0.0, 0.5, 1.0]),
    "dp_mode": st.sampled_from(["update", "sample"]),
    "dp_noise_multiplier": st.floats(0.5, 4),
    "dp_epsilon": st.floats(0.5, 16),
    "robust": st.sampled_from(["none", "median", "krum"]),
    "attackers": st.lists(st.integers(0, 7), max_size=2),
    "attack": st.sampled_from(["sign_flip", "scale"]),
    "attack_scale": st.floats(0.5, 20),
    "target_accuracy": st.floats(0, 1),
    "patience": st.integers(0, 5),
    "min_delta": st.floats(0, 0.1),
    "rollback_drop": st.floats(0, 1),
    "rollback_rounds": st.integers(1, 5),
    "keep_checkpoints": st.integers(1, 5),
}


def _split(flat: dict[str, Any], into_groups: set[str]) -> dict[str, Any]:
    """``flat`` with the fields of the groups ``into_groups`` moved into their tables."""
    document: dict[str, Any] = {}
    for name, value in flat.items():
        group = next((k for k, g in GROUPS.items() if name in _names(g)), None)
        if group in into_groups:
            document.setdefault(group, {})[name] = value
        else:
            document[name] = value
    return document


def _names(group: type) -> set[str]:
    return {f.name for f in dataclasses.fields(group)}


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries({}, optional=_VALUES),
    st.sets(st.sampled_from(sorted(GROUPS))),
)
def test_grouped_flat_and_mixed_documents_of_a_job_read_as_the_same_spec(
    fields: dict[str, Any], into_groups: set[str]
) -> None:
    flat = {"job_id": "j", "roster": ROSTER, **fields}
    try:
        spec = JobSpec.from_document(flat)
    except ConfigError:
        reject()  # a pair of fields the rules refuse together
    grouped_json = spec.to_json()
    assert set(json.loads(grouped_json)) == {"job_id", "roster", "rounds", *GROUPS}
    assert JobSpec.from_json(grouped_json) == spec
    assert JobSpec.from_json(json.dumps(flattened(json.loads(grouped_json)))) == spec
    assert JobSpec.from_document(_split(flat, into_groups)) == spec
    assert flattened(_split(flat, into_groups)) == flat


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"secur": False}, "secur: unknown job field; did you mean 'secure'?"),
        ({"averaging": {"secur": False}}, "averaging.secur: unknown job field; did you mean"),
        ({"data": {"secure": False}}, "data.secure: unknown job field"),
        ({"privacy": {"own_data": {"validaton": 0.1}}}, "privacy.own_data: unknown job field"),
        ({"data": {"own_data": {"validaton": 0.1}}}, "data.own_data.validaton: unknown"),
        ({"zzz": 1}, "zzz: unknown job field; known: job_id, roster, rounds, data, training"),
        ({"secure": False, "averaging": {"secure": True}}, "secure: given both flat and in"),
        ({"secure": False, "averaging": [1]}, "averaging: expected a table, got [1]"),
        ({"averaging": 3}, "averaging: expected a table, got 3"),
        ({"averaging": {"secure": "no"}}, "averaging.secure: expected true or false, got 'no'"),
        ({"lr": "0.1"}, "training.lr: expected a number, got '0.1'"),
    ],
)
def test_a_wrong_key_or_value_is_refused_naming_it_wherever_it_is(
    document: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        JobSpec.from_document({"job_id": "j", "roster": ROSTER, **document})
    assert message in str(refused.value)


def test_flattening_refuses_a_field_in_another_groups_table() -> None:
    with pytest.raises(ConfigError, match=r"data\.secure: unknown job field"):
        flattened({"data": {"secure": False}})
    with pytest.raises(ConfigError, match="secure: given both flat and in averaging"):
        flattened({"secure": True, "averaging": {"secure": True}})
    with pytest.raises(ConfigError, match="expected a table of job fields, got list"):
        grouped([])  # type: ignore[arg-type]


def test_mixing_the_forms_is_fine_when_no_key_is_given_twice() -> None:
    spec = JobSpec.from_document(
        {"job_id": "j", "roster": ROSTER, "secure": False, "averaging": {"schedule": "moshpit"}}
    )
    assert spec.averaging == AveragingSpec(secure=False, schedule="moshpit")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DataSpec(own_data=OwnData(validation=0.3)), "own_data is for data sets"),
        (lambda: DataSpec(alpha="1"), "alpha: expected a number"),  # type: ignore[arg-type]
        (lambda: TrainingSpec(epochs=0), "epochs must be at least 1"),
        (lambda: TrainingSpec(local_steps=-1), "local_steps at least 0"),
        (lambda: TrainingSpec(optimizer="adamw"), "optimizer: must be sgd or adam"),
        (lambda: TrainingSpec(batch_size=0), "batch_size must be at least 1"),
        (lambda: TrainingSpec(lr=0.0), "lr > 0"),
        (lambda: AveragingSpec(schedule="sometimes"), "schedule must be exact, moshpit"),
        (lambda: AveragingSpec(schedule="pushsum"), "pushsum gossip is plain averaging"),
        (lambda: AveragingSpec(gossip_staleness=0), "gossip_staleness must be >= 1"),
        (lambda: AveragingSpec(max_group=1), "max_group must be in 2..128"),
        (lambda: AveragingSpec(max_group=129), "max_group must be in 2..128"),
        (lambda: AveragingSpec(levels_bits=28, max_group=32), "does not fit Z_2\\^32"),
        (lambda: AveragingSpec(compression="zip"), "compression must be none"),
        (lambda: AveragingSpec(compression="topk"), "cannot be summed inside secure"),
        (lambda: AveragingSpec(compression="int8", schedule="moshpit"), "use schedule=exact"),
        (lambda: AveragingSpec(secure=False, topk_ratio=0.0), "topk_ratio must be in"),
        (lambda: PrivacySpec(dp_clip=-1.0), "dp_clip must be >= 0"),
        (lambda: PrivacySpec(dp_clip=1.0, dp_noise_multiplier=0.0), "dp_noise_multiplier > 0"),
        (lambda: PrivacySpec(dp_mode="example"), "dp_mode must be update or sample"),
        (lambda: PrivacySpec(dp_clip=1.0, dp_epsilon=0.0), "dp_epsilon > 0"),
        (lambda: PrivacySpec(dp_clip=1.0, dp_delta=1.0), "0 < dp_delta < 1"),
        (lambda: RobustnessSpec(robust="mean"), "robust must be none or one of"),
        (lambda: RobustnessSpec(attack="flip"), "attack is sign_flip or scale"),
        (lambda: RobustnessSpec(attackers=(-1,)), "attackers are roster positions"),
        (lambda: ProgressSpec(keep_checkpoints=0), "keep_checkpoints must be at least 1"),
        (lambda: ProgressSpec(target_accuracy=1.5), "target_accuracy and rollback_drop"),
        (lambda: ProgressSpec(rollback_rounds=0), "rollback_rounds >= 1"),
    ],
)
def test_each_group_refuses_its_own_bad_fields_when_made(make: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"robustness": RobustnessSpec(robust="median")}, "robust aggregation needs"),
        (
            {
                "averaging": AveragingSpec(secure=False, schedule="pushsum"),
                "robustness": RobustnessSpec(robust="median"),
            },
            "pushsum gossip is plain averaging",
        ),
        (
            {
                "averaging": AveragingSpec(secure=False, compression="int8"),
                "robustness": RobustnessSpec(robust="median"),
            },
            "not with pushsum or robust",
        ),
        ({"robustness": RobustnessSpec(attackers=(8,))}, "attackers are roster positions"),
        (
            {
                "privacy": PrivacySpec(dp_clip=1.0, dp_mode="sample"),
                "training": TrainingSpec(optimizer="adam"),
            },
            "trains with optimizer sgd",
        ),
        (
            {
                "privacy": PrivacySpec(dp_clip=1.0, dp_mode="sample"),
                "training": TrainingSpec(local_steps=2),
            },
            "no local_steps",
        ),
        (
            {"privacy": PrivacySpec(dp_clip=4.0, dp_noise_multiplier=4.0)},
            "quantizer's clip 8.0 would cut",
        ),
        ({"averaging": AveragingSpec(collusion=3, max_group=4)}, "collusion"),
    ],
)
def test_rules_across_groups_are_the_jobs(groups: dict[str, Any], message: str) -> None:
    # each group was made (it passed its own checks); the job refuses them together, or with
    # its roster
    with pytest.raises(ConfigError, match=message):
        JobSpec(job_id="j", roster=tuple(ROSTER), **groups)


def test_the_groups_and_their_fields_have_one_name_each() -> None:
    """A flat key finds its group by its name: no field may be in two groups, nor be a
    group's or a top-level key's name."""
    names = [f.name for group in GROUPS.values() for f in dataclasses.fields(group)]
    top = [f.name for f in dataclasses.fields(JobSpec)]
    assert len(names) == len(set(names))
    assert not set(names) & set(top)
    assert set(GROUPS) <= set(top)


def test_a_group_given_as_a_table_in_python_becomes_the_group() -> None:
    table: Any = {"secure": False}
    spec = JobSpec(job_id="j", roster=tuple(ROSTER), averaging=table)
    assert spec.averaging == AveragingSpec(secure=False)

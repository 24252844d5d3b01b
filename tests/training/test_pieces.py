"""Models, the torch adapter, partitions and strategies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfed.training import strategies
from meshfed.training.data import load_dataset, partition
from meshfed.training.models import build, names
from meshfed.training.torch_adapter import LocalTrainer, evaluate, flatten, load_flat


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "mobilenet"])
def test_models_round_trip_through_flat_vectors_without_sharing_memory(name: str) -> None:
    torch.manual_seed(0)
    model = build(name)
    vector = np.random.default_rng(0).standard_normal(len(flatten(model))).astype(np.float32)
    load_flat(model, vector)
    np.testing.assert_array_equal(flatten(model), vector)
    kept = vector.copy()
    train, _ = load_dataset("digits")
    LocalTrainer(epochs=1).train(model, train.x[:64], train.y[:64], seed=0)
    np.testing.assert_array_equal(vector, kept)  # training never writes into the caller's array
    with pytest.raises(ValueError, match="parameters"):
        load_flat(model, vector[:-1])


def test_cifar_cnn_takes_32x32_colour_images() -> None:
    model = build("cifar_cnn")
    assert model(torch.zeros(2, 3 * 32 * 32)).shape == (2, 10)


def test_unknown_models_and_strategies_name_the_known_ones() -> None:
    assert {"mlp", "cnn", "cifar_cnn", "resnet", "mobilenet"} <= set(names())
    with pytest.raises(KeyError, match="mlp"):
        build("transformer-xxl")
    with pytest.raises(KeyError, match="fedavg"):
        strategies.named("fedmagic")


def test_local_training_learns_digits() -> None:
    train, test = load_dataset("digits")
    torch.manual_seed(0)
    model = build("mlp")
    LocalTrainer(epochs=5).train(model, train.x, train.y, seed=1)
    assert evaluate(model, test.x, test.y)[1] > 0.9


@pytest.mark.parametrize(("epochs", "steps", "expected"), [(2, 0, 6), (1, 5, 5), (1, 2, 2)])
def test_local_training_takes_epochs_or_exactly_the_steps_asked_for(
    epochs: int, steps: int, expected: int
) -> None:
    model = build("mlp", hidden=[8])
    train, _ = load_dataset("digits")
    trainer = LocalTrainer(epochs=epochs, steps=steps, batch_size=4)
    optimizer = trainer.make_optimizer(model)
    taken = 0

    def count(*_: object) -> None:
        nonlocal taken
        taken += 1

    optimizer.register_step_post_hook(count)
    trainer.train(model, train.x[:10], train.y[:10], seed=0, optimizer=optimizer)  # 3 batches
    assert taken == expected
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    trainer.train(model, train.x[:10], train.y[:10], seed=1, optimizer=optimizer)
    assert not torch.equal(
        optimizer.state[next(model.parameters())]["momentum_buffer"], momentum[0]
    )


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(["iid", "dirichlet", "quantity"]),
    st.integers(2, 12),
    st.floats(0.1, 10),
    st.integers(0, 100),
)
def test_partitions_are_disjoint_complete_and_reproducible(
    scheme: str, peers: int, alpha: float, seed: int
) -> None:
    labels = np.random.default_rng(seed).integers(0, 10, 1500)
    shards = partition(labels, peers, scheme=scheme, alpha=alpha, seed=seed, min_size=5)
    joined = np.concatenate(shards)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    assert all(len(shard) >= 5 for shard in shards)
    again = partition(labels, peers, scheme=scheme, alpha=alpha, seed=seed, min_size=5)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))


def test_small_alpha_skews_labels() -> None:
    labels = np.repeat(np.arange(10), 150)
    skewed = partition(labels, 8, scheme="dirichlet", alpha=0.1, seed=1)
    even = partition(labels, 8, scheme="iid", seed=1)

    def classes(shards: list[np.ndarray]) -> float:
        return float(np.mean([len(np.unique(labels[s])) for s in shards]))

    assert classes(skewed) < classes(even) == 10


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_strategies_move_towards_the_average_and_keep_their_state(name: str) -> None:
    strategy = strategies.named(name)
    base = np.zeros(4, np.float32)
    average = np.ones(4, np.float32)
    step = strategy.apply(base, average)
    assert np.all(step > 0) and np.all(step <= 1.0 + 1e-6)
    copy = strategies.named(name)
    copy.load_state_dict(strategy.state_dict())
    np.testing.assert_array_equal(copy.apply(step, average), strategy.apply(step, average))

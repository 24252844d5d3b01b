"""DP-SGD: per-example clipping, noise on every step, and the privacy a round costs."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp
from torch import nn

from meshfed.privacy.accountant import PrivacyAccountant
from meshfed.privacy.dpsgd import DPSGDTrainer, clipped_gradient_sum
from meshfed.training.models import build
from meshfed.training.torch_adapter import flatten


def _example_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    gradients = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))  # type: ignore[union-attr]
    return gradients


@pytest.mark.parametrize(("seed", "clip"), [(0, 0.05), (1, 0.5), (2, 1e6)])
def test_each_examples_gradient_is_clipped_on_its_own_before_the_sum(
    seed: int, clip: float
) -> None:
    torch.manual_seed(seed)
    model = build("mlp", hidden=[16])
    x, y = torch.randn(7, 64), torch.randint(0, 10, (7,))
    sums, _ = clipped_gradient_sum(model, x, y, clip=clip)
    expected = sum(g * min(1.0, clip / float(g.norm())) for g in _example_gradients(model, x, y))
    got = torch.cat([sums[name].flatten() for name, _ in model.named_parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    if clip < 1:  # every example's gradient was longer than the clip: the sum is at most n clip
        assert float(got.norm()) <= len(x) * clip * (1 + 1e-5)


def test_with_the_whole_data_in_every_step_and_no_real_noise_it_is_plain_gradient_descent() -> None:
    torch.manual_seed(0)
    model = build("mlp", hidden=[16])
    x = np.random.default_rng(0).normal(size=(20, 64)).astype(np.float32)
    y = np.arange(20, dtype=np.int64) % 10
    reference = build("mlp", hidden=[16])
    reference.load_state_dict(model.state_dict())
    trainer = DPSGDTrainer(clip=1e3, noise_multiplier=1e-9, batch_size=20, lr=0.1)
    trainer.train(model, x, y, seed=0)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    nn.functional.cross_entropy(reference(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    optimizer.step()
    np.testing.assert_allclose(flatten(model), flatten(reference), atol=1e-5)


def test_the_noise_is_fresh_even_when_the_round_seed_repeats() -> None:
    x = np.random.default_rng(1).normal(size=(40, 64)).astype(np.float32)
    y = np.arange(40, dtype=np.int64) % 10
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build("mlp", hidden=[16])
        DPSGDTrainer(clip=1.0, noise_multiplier=1.0, batch_size=8).train(model, x, y, seed=5)
        results.append(flatten(model))
    assert not np.allclose(results[0], results[1])


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_each_steps_gradient_sum_leaves_with_noise_of_std_sigma_clip(sigma: float) -> None:
    """With every example in the step (q = 1), what training adds to the model beyond the
    clipped gradient sum is the noise: measured, it has std sigma C per coordinate."""
    x = np.random.default_rng(3).normal(size=(30, 64)).astype(np.float32)
    y = np.arange(30, dtype=np.int64) % 10
    trainer = DPSGDTrainer(clip=0.5, noise_multiplier=sigma, batch_size=30, lr=0.1)
    torch.manual_seed(0)
    model = build("mlp", hidden=[256])
    sums, _ = clipped_gradient_sum(model, torch.from_numpy(x), torch.from_numpy(y), clip=0.5)
    clean = torch.cat([sums[name].flatten() for name, _ in model.named_parameters()]).numpy()
    before = flatten(model)
    trainer.train(model, x, y, seed=0)
    noise = (before - flatten(model)).astype(np.float64) * 30 / 0.1 - clean
    assert np.std(noise) == pytest.approx(sigma * 0.5, rel=0.03)
    assert abs(np.mean(noise)) < 0.05 * sigma * 0.5


def test_the_batches_cannot_be_rebuilt_from_the_public_round_seed() -> None:
    """The attacker holds the job spec (so the round's seed) and the trained model; with the
    batches known, it could replay the round and isolate one example's part in it."""
    x = np.random.default_rng(2).normal(size=(40, 64)).astype(np.float32)
    y = np.arange(40, dtype=np.int64) % 10
    trainer = DPSGDTrainer(clip=1.0, noise_multiplier=1e-6, batch_size=20, lr=0.5)
    torch.manual_seed(0)
    model = build("mlp", hidden=[16])
    start = build("mlp", hidden=[16])
    start.load_state_dict(model.state_dict())
    trainer.train(model, x, y, seed=7)

    def replay(sampling: torch.Generator) -> np.ndarray:
        replica = build("mlp", hidden=[16])
        replica.load_state_dict(start.state_dict())
        inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
        rate = trainer.sampling_rate(len(x))
        for _ in range(trainer.steps(len(x))):
            batch = torch.nonzero(torch.rand(len(x), generator=sampling) < rate).flatten()
            sums, _ = clipped_gradient_sum(replica, inputs[batch], labels[batch], clip=1.0)
            with torch.no_grad():
                for name, parameter in replica.named_parameters():
                    parameter.sub_(sums[name], alpha=trainer.lr / (rate * len(x)))
        return flatten(replica)

    # the sampler a seeded trainer would use: it would match to the (tiny) noise
    guess = replay(torch.Generator().manual_seed(7))
    assert np.abs(flatten(model) - guess).max() > 1e-3


def test_a_round_costs_its_steps_of_poisson_sampled_gaussian_mechanisms() -> None:
    trainer = DPSGDTrainer(clip=1.0, noise_multiplier=1.1, epochs=2, batch_size=16)
    event, times = trainer.event(200)
    assert (event.sampling_rate, times) == (0.08, 2 * 13)
    accountant = PrivacyAccountant(budget_epsilon=100, delta=1e-5)
    accountant.compose(event, times)
    reference = rdp.RdpAccountant()
    reference.compose(
        dp_accounting.PoissonSampledDpEvent(0.08, dp_accounting.GaussianDpEvent(1.1)), 26
    )
    assert accountant.epsilon() == pytest.approx(reference.get_epsilon(1e-5))


def test_batch_normalization_is_refused() -> None:
    model = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))
    x, y = np.zeros((4, 64), np.float32), np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="batch normalization"):
        DPSGDTrainer(clip=1.0, noise_multiplier=1.0).train(model, x, y, seed=0)

"""DP-SGD (Abadi et al. 2016): local training with example-level differential privacy.

Each step takes a Poisson sample of the peer's examples (each one in with probability
``q = batch_size / n``), computes every sampled example's gradient separately (``torch.func``:
``vmap`` over ``grad``), clips each to L2 norm ``clip``, sums them, adds Gaussian noise of std
``noise_multiplier x clip`` to the sum and divides by the expected batch size ``q n``. Everything
the peer releases afterwards (its trained model, its share of a group sum) is post-processing,
so the accountant charges ``steps`` Poisson-subsampled Gaussian events per round
(:meth:`DPSGDTrainer.event`), whatever the averaging does.

Amplification by subsampling assumes the sample is secret: the batches and the noise come from
the OS's cryptographic generator (:class:`.noise.SecureRandom`), never from the round's public
seed, and each noisy sum is rounded to its noise's grid (the least-significant-bit defence).
Models with batch normalization are refused: batch statistics mix the examples of a batch, so
per-example clipping would not bound one example's influence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .accountant import GaussianEvent
from .noise import SecureRandom

__all__ = ["DPSGDTrainer", "clipped_gradient_sum"]


def _check_per_example(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                "DP-SGD needs per-example gradients: batch normalization mixes the examples of a "
                "batch (use GroupNorm)"
            )


def clipped_gradient_sum(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, clip: float
) -> tuple[dict[str, torch.Tensor], float]:
    """The sum over the examples of ``(x, y)`` of each example's cross-entropy gradient,
    each clipped to L2 norm ``clip`` (over all parameters together), by parameter name; and
    the sum of the examples' losses."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    if len(x) == 0:
        return {name: torch.zeros_like(p) for name, p in params.items()}, 0.0

    def loss_of(
        p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        loss = nn.functional.cross_entropy(logits, yi.unsqueeze(0))
        return loss, loss.detach()

    per_example, losses = vmap(grad(loss_of, has_aux=True), in_dims=(None, 0, 0))(params, x, y)
    squares = torch.stack([g.flatten(1).pow(2).sum(1) for g in per_example.values()]).sum(0)
    scale = (clip / (squares.sqrt() + 1e-12)).clamp(max=1.0)
    sums = {name: torch.einsum("b,b...->...", scale, g) for name, g in per_example.items()}
    return sums, float(losses.sum())


@dataclass(frozen=True, slots=True, kw_only=True)
class DPSGDTrainer:
    """Local DP-SGD, with the interface of :class:`~meshfed.training.torch_adapter.LocalTrainer`.

    Attributes:
        clip: L2 bound on each example's gradient.
        noise_multiplier: noise std on each step's gradient sum, in units of ``clip``.
        epochs: passes over the local data per round (in expectation: ``ceil(n / batch_size)``
            Poisson-sampled steps each).
        batch_size: the expected number of examples per step.
        lr: learning rate of plain SGD (momentum would be post-processing too, but keeps
            a state that local rounds restart anyway).
    """

    clip: float
    noise_multiplier: float
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05

    def __post_init__(self) -> None:
        if not self.clip > 0 or not self.noise_multiplier > 0:
            raise ValueError("DP-SGD needs clip > 0 and noise_multiplier > 0")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")

    def sampling_rate(self, examples: int) -> float:
        """The probability that one example is in one step's batch."""
        return min(1.0, self.batch_size / max(examples, 1))

    def steps(self, examples: int) -> int:
        """Steps per round on ``examples`` examples."""
        return self.epochs * math.ceil(1 / self.sampling_rate(examples))

    def event(self, examples: int) -> tuple[GaussianEvent, int]:
        """What one round costs in privacy: ``(event, times)`` for the accountant."""
        rate = self.sampling_rate(examples)
        return GaussianEvent(self.noise_multiplier, sampling_rate=rate), self.steps(examples)

    def train(
        self,
        model: nn.Module,
        x: npt.NDArray[np.float32],
        y: npt.NDArray[np.int64],
        *,
        seed: int,
        random: SecureRandom | None = None,
    ) -> float:
        """Train ``model`` in place; returns the mean loss of the round's sampled examples
        (before each step). ``seed``, the round's public seed of the trainers' common interface,
        decides nothing here: batches and noise come from ``random`` (the OS's generator)."""
        del seed  # public: a sample known to others would void the amplification
        _check_per_example(model)
        random = random or SecureRandom()
        inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
        rate = self.sampling_rate(len(inputs))
        expected = rate * len(inputs)
        std = self.noise_multiplier * self.clip
        model.train()
        total, seen = 0.0, 0
        for _ in range(self.steps(len(inputs))):
            batch = torch.from_numpy(np.flatnonzero(random.bernoulli(len(inputs), rate)))
            sums, loss = clipped_gradient_sum(model, inputs[batch], labels[batch], clip=self.clip)
            total, seen = total + loss, seen + len(batch)
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    noisy = random.release(sums[name].numpy(), std)
                    parameter.sub_(torch.from_numpy(noisy), alpha=self.lr / expected)
        return total / max(seen, 1)

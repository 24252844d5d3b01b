"""A torch model as a flat float32 vector, and local training and evaluation.

Averaging works on flat vectors: :func:`flatten` copies a model's parameters into one float32
numpy array (in ``model.parameters()`` order) and :func:`load_flat` writes one back. Both ends of a
job build the same architecture by name, so the order is the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

__all__ = ["LocalTrainer", "evaluate", "flatten", "load_flat"]


def flatten(model: nn.Module) -> npt.NDArray[np.float32]:
    """The model's parameters as one new float32 vector."""
    with torch.no_grad():
        vector: npt.NDArray[np.float32] = (
            parameters_to_vector(model.parameters()).detach().cpu().numpy().astype(np.float32)
        )
    return vector


def load_flat(model: nn.Module, vector: npt.NDArray[np.float32]) -> None:
    """Write ``vector`` (as from :func:`flatten`) into the model's parameters.

    Raises:
        ValueError: a vector of the wrong length.
    """
    count = sum(p.numel() for p in model.parameters())
    if vector.shape != (count,):
        raise ValueError(f"the model has {count} parameters, the vector {vector.shape}")
    # Copy into each parameter's own storage: vector_to_parameters would make the parameters
    # views of ``vector``, so training would then write into the caller's array.
    with torch.no_grad():
        offset = 0
        for parameter in model.parameters():
            size = parameter.numel()
            chunk = torch.from_numpy(vector[offset : offset + size]).view_as(parameter)
            parameter.copy_(chunk)
            offset += size


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalTrainer:
    """Local training on one peer's data.

    Attributes:
        epochs: passes over the local data per round.
        batch_size: examples per step.
        lr: learning rate.
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``.
        prox_mu: FedProx's proximal weight; 0 is plain local SGD (FedAvg).
        steps: if > 0, train exactly this many minibatch steps instead of ``epochs`` passes
            (e.g. one step per push-sum tick, as SGP does).
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    prox_mu: float = 0.0
    steps: int = 0

    def _passes(self, examples: int, generator: torch.Generator) -> Iterator[list[torch.Tensor]]:
        """The minibatches of each pass over the data: ``epochs`` passes, or as many as
        ``steps`` batches take (the last one cut short)."""
        left = self.steps or len(range(0, examples, self.batch_size)) * self.epochs
        while left > 0 and examples:
            order = torch.randperm(examples, generator=generator)
            batches = [order[i : i + self.batch_size] for i in range(0, examples, self.batch_size)]
            yield batches[:left]
            left -= len(batches)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The local optimizer over ``model``'s parameters."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9)
        if self.optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=self.lr)
        raise ValueError(f"optimizer must be 'sgd' or 'adam', not {self.optimizer!r}")

    def train(
        self,
        model: nn.Module,
        x: npt.NDArray[np.float32],
        y: npt.NDArray[np.int64],
        *,
        seed: int,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> float:
        """Train ``model`` in place; returns the mean training loss of the last epoch.

        A fresh optimizer (:meth:`make_optimizer`) each call, unless ``optimizer`` is given:
        one kept across calls keeps its momentum (push-sum's short ticks need that).
        """
        optimizer = optimizer or self.make_optimizer(model)
        anchor = [p.detach().clone() for p in model.parameters()] if self.prox_mu else []
        inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
        generator = torch.Generator().manual_seed(seed)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        last = 0.0
        for batches in self._passes(len(inputs), generator):
            total, seen = 0.0, 0
            for batch in batches:
                optimizer.zero_grad()
                loss = loss_fn(model(inputs[batch]), labels[batch])
                if self.prox_mu:
                    drift = sum(
                        ((p - a) ** 2).sum()
                        for p, a in zip(model.parameters(), anchor, strict=True)
                    )
                    loss = loss + self.prox_mu / 2 * drift
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
                seen += len(batch)
            last = total / max(seen, 1)
        return last


def evaluate(
    model: nn.Module, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]
) -> tuple[float, float]:
    """``(loss, accuracy)`` of ``model`` on ``(x, y)``."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        labels = torch.from_numpy(y)
        loss = float(nn.functional.cross_entropy(logits, labels))
        accuracy = float((logits.argmax(dim=1) == labels).float().mean())
    return loss, accuracy

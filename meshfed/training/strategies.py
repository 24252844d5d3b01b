"""Algorithms as strategy objects: what every peer does with the group's averaged model.

Every peer of a job holds the same strategy state and applies it to the same average, so the
peers stay identical without a server: FedAvg (and FedProx, which differs only in the local
loss), and the FedOpt outer optimizers of Reddi et al. (ICLR 2021), FedAvgM, FedAdam, FedYogi
and FedAdagrad, which treat ``average - base`` as a pseudo-gradient step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedProx", "FedYogi", "Strategy", "named"]

Vector = npt.NDArray[np.float32]


@dataclass
class Strategy:
    """Base: ``apply(base, average)`` returns the next model. ``prox_mu`` is the local
    proximal weight the trainers use (FedProx)."""

    prox_mu: float = 0.0

    def apply(self, base: Vector, average: Vector) -> Vector:
        """The next model from this round's starting model and the peers' average."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (checkpoints)."""
        return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in vars(self).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class FedAvg(Strategy):
    """``base + server_lr (average - base)``; with ``server_lr = 1`` the average itself."""

    server_lr: float = 1.0

    def apply(self, base: Vector, average: Vector) -> Vector:
        if self.server_lr == 1.0:
            return average.copy()
        return (base + self.server_lr * (average - base)).astype(np.float32)


@dataclass
class FedProx(FedAvg):
    """FedAvg with a proximal term ``mu / 2 ||w - base||^2`` in every local loss."""

    prox_mu: float = 0.01


@dataclass
class FedAvgM(Strategy):
    """Server momentum: ``v = momentum v + (average - base)``, ``base + server_lr v``."""

    server_lr: float = 1.0
    momentum: float = 0.9
    velocity: Vector | None = field(default=None, repr=False)

    def apply(self, base: Vector, average: Vector) -> Vector:
        delta = average - base
        self.velocity = delta if self.velocity is None else self.momentum * self.velocity + delta
        return (base + self.server_lr * self.velocity).astype(np.float32)


@dataclass
class _Adaptive(Strategy):
    """Shared FedOpt machinery: first and second moments of the pseudo-gradient."""

    server_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    moment1: Vector | None = field(default=None, repr=False)
    moment2: Vector | None = field(default=None, repr=False)

    def _second(self, previous: Vector, squared: Vector) -> Vector:
        raise NotImplementedError

    def apply(self, base: Vector, average: Vector) -> Vector:
        delta = average - base
        squared = delta * delta
        m = np.zeros_like(delta) if self.moment1 is None else self.moment1
        v = np.full_like(delta, self.tau**2) if self.moment2 is None else self.moment2
        self.moment1 = self.beta1 * m + (1 - self.beta1) * delta
        self.moment2 = self._second(v, squared)
        step = self.server_lr * self.moment1 / (np.sqrt(self.moment2) + self.tau)
        return (base + step).astype(np.float32)


@dataclass
class FedAdam(_Adaptive):
    """``v = beta2 v + (1 - beta2) delta^2``."""

    def _second(self, previous: Vector, squared: Vector) -> Vector:
        return self.beta2 * previous + (1 - self.beta2) * squared


@dataclass
class FedYogi(_Adaptive):
    """``v = v - (1 - beta2) delta^2 sign(v - delta^2)`` (grows v more cautiously)."""

    def _second(self, previous: Vector, squared: Vector) -> Vector:
        change: Vector = (1 - self.beta2) * squared * np.sign(previous - squared)
        return previous - change


@dataclass
class FedAdagrad(_Adaptive):
    """``v = v + delta^2``."""

    def _second(self, previous: Vector, squared: Vector) -> Vector:
        return previous + squared


_BY_NAME: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
}


def named(name: str, **options: Any) -> Strategy:
    """The strategy called ``name`` (``fedavg``, ``fedprox``, ``fedavgm``, ``fedadam``,
    ``fedyogi``, ``fedadagrad``) with ``options``.

    Raises:
        KeyError: an unknown name.
    """
    try:
        return _BY_NAME[name.lower()](**options)
    except KeyError:
        raise KeyError(f"no strategy {name!r}; known: {', '.join(_BY_NAME)}") from None

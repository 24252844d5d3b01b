"""What a job does after each round: continue, roll back to its best checkpoint, or stop.

:class:`ProgressPolicy` is sans-IO: it is fed each round's validation accuracy and returns a
decision; the training peer carries it out (loads the checkpoint, stops). Its state is a pure
function of the accuracies it was fed, so a peer that restarts rebuilds it by feeding the
rounds recorded in its store again. With the ``exact`` schedule every peer holds the same model
and evaluates it on the same test split, so every peer takes the same decision at the same
round.

The rules (SPEC 7c, "Checkpoints, rollback, convergence"), in this order each round:

1. **Target**: accuracy >= ``target_accuracy`` stops the job (:class:`Converged` ``target``).
2. **Rollback**: accuracy below ``best - rollback_drop`` for ``rollback_rounds`` consecutive
   rounds returns :class:`Rollback` to the round of the best accuracy so far (the earliest on
   ties); the count starts again.
3. **Plateau**: no accuracy above the last reference + ``min_delta`` for ``patience``
   consecutive rounds stops the job (:class:`Converged` ``plateau``); a round that beats it
   becomes the reference. Rollbacks do not reset this count, so a job that keeps degrading
   after rolling back ends on the plateau rule.

A zero ``target_accuracy``, ``rollback_drop`` or ``patience`` turns that rule off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

__all__ = ["Continue", "Converged", "Decision", "ProgressPolicy", "Rollback"]


@dataclass(frozen=True, slots=True)
class Continue:
    """Go on with the next round."""


@dataclass(frozen=True, slots=True)
class Rollback:
    """Reload the checkpoint of round :attr:`to_round` (model and strategy state, not the
    privacy spent), then go on."""

    to_round: int


@dataclass(frozen=True, slots=True)
class Converged:
    """Stop the job: the target accuracy was reached, or accuracy reached a plateau."""

    reason: Literal["target", "plateau"]


Decision = Continue | Rollback | Converged


class ProgressPolicy:
    """Decides after each round (see the module docstring). All arguments keyword-only.

    Raises:
        ConfigError: an argument out of range.
    """

    def __init__(
        self,
        *,
        target_accuracy: float = 0.0,
        patience: int = 0,
        min_delta: float = 0.0,
        rollback_drop: float = 0.0,
        rollback_rounds: int = 3,
    ) -> None:
        if not 0 <= target_accuracy <= 1 or not 0 <= rollback_drop <= 1:
            raise ConfigError("target_accuracy and rollback_drop must be in [0, 1]")
        if patience < 0 or min_delta < 0 or rollback_rounds < 1:
            raise ConfigError("patience and min_delta must be >= 0, rollback_rounds >= 1")
        self.target_accuracy = target_accuracy
        self.patience = patience
        self.min_delta = min_delta
        self.rollback_drop = rollback_drop
        self.rollback_rounds = rollback_rounds
        #: the best accuracy so far and its round (None before the first round)
        self.best_accuracy = -math.inf
        self.best_round: int | None = None
        self._below = 0
        self._reference = -math.inf
        self._waited = 0
        self._last_round = -1

    def observe(self, round: int, accuracy: float) -> Decision:
        """Round ``round`` (rounds come in increasing order) ended with ``accuracy``; what now.

        Raises:
            ValueError: a round that is not after the previous one.
        """
        if round <= self._last_round:
            raise ValueError(f"round {round} comes after round {self._last_round}, not before")
        self._last_round = round
        if math.isnan(accuracy):
            accuracy = 0.0  # a diverged model
        if self.target_accuracy and accuracy >= self.target_accuracy:
            return Converged("target")
        decision: Decision = Continue()
        if self.rollback_drop and self.best_round is not None:
            self._below = (
                self._below + 1 if accuracy < self.best_accuracy - self.rollback_drop else 0
            )
            if self._below >= self.rollback_rounds:
                self._below = 0
                decision = Rollback(self.best_round)
        if accuracy > self.best_accuracy:
            self.best_accuracy, self.best_round = accuracy, round
        if self.patience:
            if accuracy > self._reference + self.min_delta:
                self._reference, self._waited = accuracy, 0
            else:
                self._waited += 1
                if self._waited >= self.patience:
                    return Converged("plateau")
        return decision

"""Whether this install can train.

Training, its bundled data sets and differential privacy's accountant need the ``train``
extra (``pip install 'meshfed[train]'``: torch, scikit-learn, dp-accounting). The core node
(identity, transports, membership, the market and its ledger, relaying, secure aggregation,
the REST API) runs without it; such a node neither advertises the ``trainer`` role nor asks a
price for training, so it is never asked to bid, and declines an RFQ for training as a kind it
does not sell. Asking it for training (a job file, a testnet, a training order to check:
checking one builds its model) raises a :class:`~meshfed.errors.ConfigError` that names the
extra. Finding a module costs no import:
torch stays unloaded until training runs.
"""

from __future__ import annotations

import importlib.util

from ..errors import ConfigError

__all__ = ["TRAIN_EXTRA", "TRAIN_MODULES", "require_training", "training_missing"]

#: what to install for training
TRAIN_EXTRA = "pip install 'meshfed[train]'"
#: the modules training imports that the core install lacks
TRAIN_MODULES: tuple[str, ...] = ("torch", "sklearn", "dp_accounting")


def training_missing() -> list[str]:
    """The modules of :data:`TRAIN_MODULES` this interpreter cannot find (none: it can
    train). Nothing is imported."""
    return [name for name in TRAIN_MODULES if importlib.util.find_spec(name) is None]


def require_training(what: str) -> None:
    """Raise unless this install can train.

    Raises:
        ConfigError: ``what`` needs training, which is not installed here (the message
            names the missing modules and the extra).
    """
    missing = training_missing()
    if missing:
        raise ConfigError(
            f"{what} needs training, which this node lacks (no {', '.join(missing)}): {TRAIN_EXTRA}"
        )

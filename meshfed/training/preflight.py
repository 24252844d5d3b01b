"""What a job needs before its first round, built and checked: data, shards, model, strategy.

:func:`prepare` loads the data set, splits it among the roster (:func:`job_shards`) (or takes
the peer's own registered data, for a data set the peers registered themselves), builds the
model and runs it on a batch of the data (:func:`..models.check_fits`), and builds the
strategy. Whatever does not fit is a :class:`~meshfed.errors.ConfigError` naming the job field
to change, raised before any training, so that a job that cannot run is refused at its start
(``job_failed``) and never fails in a worker thread mid-round. The testnet and the simulation
call it before they start any node.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from ..errors import ConfigError
from .data import BUNDLED, Dataset, load_dataset, min_shard_size, most_peers, partition
from .models import build, check_fits
from .strategies import Strategy, named

if TYPE_CHECKING:
    from .spec import JobSpec

__all__ = ["JobParts", "job_shards", "prepare"]


@dataclass(frozen=True, slots=True)
class JobParts:
    """A job's ingredients on one peer (the same on every peer: all are seeded by the job)."""

    #: the bundled data set's training part, or this peer's own (all of it its shard)
    train: Dataset
    #: the bundled test split, or the validation part this peer holds out of its own data
    test: Dataset
    #: every roster peer's shard of ``train`` (indices), in roster order; empty when each
    #: peer trains on its own data
    shards: list[npt.NDArray[np.int64]]
    #: the model every peer starts from
    model: nn.Module
    strategy: Strategy


def prepare(spec: JobSpec, own: tuple[Dataset, Dataset, int] | None = None) -> JobParts:
    """Build and check what ``spec`` needs (no training).

    Args:
        own: for a data set the peers registered themselves, this peer's ``(train,
            validation, classes)`` (:meth:`meshfed.data.registry.DataRegistry.load`).

    Raises:
        ConfigError: ``dataset``, ``partition``, ``model``, ``model_options`` or ``algorithm``
            cannot work, with what to change.
    """
    if own is not None:
        train, test, classes = own
        shards: list[npt.NDArray[np.int64]] = []
    elif spec.data.own:
        raise ConfigError(
            f"dataset: {spec.data.dataset!r} is not bundled ({', '.join(BUNDLED)}): each peer "
            "trains on its own copy, registered with `meshfed-node data add`"
        )
    else:
        try:
            train, test = load_dataset(spec.data.dataset, seed=spec.training.seed)
        except KeyError as exc:
            raise ConfigError(f"dataset: {exc.args[0]}") from None
        try:
            shards = job_shards(spec, train)
        except ValueError as exc:
            raise ConfigError(f"partition: {exc}{_capacity(spec, train)}") from None
        classes = int(max(train.y.max(), test.y.max())) + 1
    try:
        model = _initial_model(spec)
    except KeyError as exc:
        raise ConfigError(f"model: {exc.args[0]}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model_options: {exc}") from None
    try:
        check_fits(model, train.x[: min(len(train), spec.training.batch_size)], classes)
    except ValueError as exc:
        raise ConfigError(
            f"model, model_options: {spec.training.model} with "
            f"{spec.training.model_options or 'no options'} does not fit data set "
            f"{spec.data.dataset!r} ({train.x.shape[1]} features per example, {classes} "
            f"classes): {exc}"
        ) from None
    try:
        strategy = named(spec.training.algorithm, **spec.training.algorithm_options)
    except KeyError as exc:
        raise ConfigError(f"algorithm: {exc.args[0]}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"algorithm_options: {exc}") from None
    return JobParts(train, test, shards, model, strategy)


def job_shards(spec: JobSpec, train: Dataset) -> list[npt.NDArray[np.int64]]:
    """Every roster peer's shard of ``train`` (indices), as every peer computes it.

    Raises:
        ValueError: the partition cannot give every peer its minimum.
    """
    peers = len(spec.roster)
    return partition(
        train.y,
        peers,
        scheme=spec.data.partition,
        alpha=spec.data.alpha,
        seed=spec.training.seed,
        min_size=min_shard_size(len(train), peers),
    )


def _capacity(spec: JobSpec, train: Dataset) -> str:
    """How many peers the data set can feed with this partition, as advice."""
    if spec.data.partition not in ("dirichlet", "quantity"):
        return ""
    most = most_peers(
        train.y, scheme=spec.data.partition, alpha=spec.data.alpha, seed=spec.training.seed
    )
    return (
        f"; {spec.data.dataset} ({len(train)} training examples) feeds about {most} peers with "
        f"{spec.data.partition} alpha {spec.data.alpha}: use fewer peers, a larger alpha, "
        "partition iid, or dataset synthetic"
    )


#: torch's default generator is the process's: jobs prepared at once (in worker threads)
#: would draw their initial weights from each other's seed
_MODEL_INIT = threading.Lock()


def _initial_model(spec: JobSpec) -> nn.Module:
    """The model every peer of ``spec`` starts from (the same weights: from the job's seed).

    Raises:
        KeyError, ValueError, TypeError: an unknown model, or options it does not take.
    """
    with _MODEL_INIT, torch.random.fork_rng(devices=[]):  # leaves the generator as it was
        torch.manual_seed(spec.training.seed)
        return build(spec.training.model, **spec.training.model_options)

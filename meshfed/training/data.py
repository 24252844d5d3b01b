"""Data sets that need no download, and how a job splits them among its peers.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes),
  pixels scaled to [0, 1].
- ``synthetic``: a generated 10-class task with 64 features (``make_classification``), as
  large as asked, for scale tests.

Any other name is a data set each peer registered itself (:mod:`meshfed.data`): every peer of
the job trains on its own copy and evaluates on the part it holds out, as :class:`OwnData` says.

Partitions (:func:`partition`) are pure functions of (labels, peers, scheme, alpha, seed), so
every peer of a job computes the same split and takes its own shard: ``iid`` (a shuffled deal),
``dirichlet`` (label skew: each class is divided among peers in Dirichlet(alpha) proportions;
small alpha means few classes per peer), ``quantity`` (quantity skew: shard sizes in
Dirichlet(alpha) proportions, labels mixed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError

__all__ = [
    "BUNDLED",
    "Dataset",
    "OwnData",
    "load_dataset",
    "min_shard_size",
    "most_peers",
    "own_weight",
    "partition",
]

#: the data sets every peer can load without a download (a job partitions them)
BUNDLED = ("digits", "synthetic")


@dataclass(frozen=True, slots=True)
class Dataset:
    """Features (float32, one row per example) and integer labels."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.y)

    def take(self, indices: npt.NDArray[np.int64]) -> Dataset:
        """The examples at ``indices``."""
        return Dataset(self.x[indices], self.y[indices])


@dataclass(frozen=True, kw_only=True)
class OwnData:
    """How the peers of a job use their own registered copies of its data set (not for the
    bundled ones, which the job partitions).

    Attributes:
        validation: the share of its examples each peer holds out to evaluate on (the split is
            fixed by the data set's name and file digest).
        max_examples: the most training examples a peer's weight in averages counts: a peer
            with ``n`` examples to train on (its data set less the part held out) weighs
            ``min(n, max_examples) / max_examples``, so no peer weighs more than 1 whatever it
            claims; best the largest example count among the roster's offers. 0: every peer
            weighs the same.
    """

    validation: float = 0.2
    max_examples: int = 0

    def __post_init__(self) -> None:
        if type(self.validation) is int:
            object.__setattr__(self, "validation", float(self.validation))
        if type(self.validation) is not float or not 0 < self.validation < 1:
            raise ConfigError(f"own_data.validation must be in (0, 1), not {self.validation!r}")
        if type(self.max_examples) is not int or self.max_examples < 0:
            raise ConfigError(f"own_data.max_examples must be >= 0, not {self.max_examples!r}")


def own_weight(examples: int, own: OwnData) -> float:
    """A peer's weight in averages when it trains on ``examples`` of its own (see
    :attr:`OwnData.max_examples`)."""
    if not own.max_examples:
        return 1.0
    return min(examples, own.max_examples) / own.max_examples


def load_dataset(name: str, *, seed: int = 0, size: int = 20_000) -> tuple[Dataset, Dataset]:
    """``(train, test)`` of data set ``name`` (test is a fixed 20% split from ``seed``).

    Raises:
        KeyError: an unknown data set.
    """
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = (bunch.data / 16.0).astype(np.float32)
        y = bunch.target.astype(np.int64)
    elif name == "synthetic":
        from sklearn.datasets import make_classification

        features, labels = make_classification(
            n_samples=size, n_features=64, n_informative=24, n_classes=10, random_state=seed
        )
        x, y = features.astype(np.float32), labels.astype(np.int64)
    else:
        raise KeyError(f"no data set {name!r}; known: digits, synthetic")
    order = np.random.default_rng(seed).permutation(len(y))
    cut = len(y) * 4 // 5
    whole = Dataset(x, y)
    return whole.take(order[:cut]), whole.take(order[cut:])


def min_shard_size(examples: int, peers: int) -> int:
    """The fewest examples a job's partition gives a peer: 10, fewer for hundreds of peers
    (a quarter of an even share), at least 1."""
    return max(1, min(10, examples // (4 * peers)))


def most_peers(
    labels: npt.NDArray[np.int64], *, scheme: str, alpha: float, seed: int = 0, attempts: int = 20
) -> int:
    """About how many peers a job's partition of ``labels`` can feed (each at least
    :func:`min_shard_size`): the largest count found by bisection whose split succeeds within
    ``attempts`` draws (a little below what the 1,000 draws of :func:`partition` reach)."""

    def fits(peers: int) -> bool:
        try:
            partition(
                labels, peers, scheme=scheme, alpha=alpha, seed=seed,
                min_size=min_shard_size(len(labels), peers), attempts=attempts,
            )  # fmt: skip
        except ValueError:
            return False
        return True

    low, high = 1, len(labels)  # fits(low); the answer is below high + 1
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def partition(
    labels: npt.NDArray[np.int64],
    peers: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 10,
    attempts: int | None = None,
) -> list[npt.NDArray[np.int64]]:
    """The indices of each peer's shard (disjoint, together all of ``labels``). The skewed
    schemes draw until every peer has ``min_size`` examples, at most ``attempts`` times (by
    default 1,000 label-skew draws, or 1,000,000 of the far cheaper size-skew ones: at alpha
    0.1, 12 peers take ~30,000).

    Raises:
        ValueError: an unknown scheme, or too few examples for ``peers`` x ``min_size``.
    """
    if peers < 1 or len(labels) < peers * min_size:
        raise ValueError(f"{len(labels)} examples cannot give {peers} peers {min_size} each")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), peers)]
    if scheme == "quantity":
        for _ in range(attempts or 1_000_000):
            shares = rng.dirichlet(np.full(peers, alpha))
            sizes = np.floor(shares * len(labels)).astype(int)
            if sizes.min() >= min_size:
                cuts = np.cumsum(sizes)[:-1]
                return [np.sort(part) for part in np.split(rng.permutation(len(labels)), cuts)]
        raise ValueError(f"alpha {alpha} leaves some of {peers} peers under {min_size} examples")
    if scheme == "dirichlet":
        for _ in range(attempts or 1000):  # redraw until every peer has min_size examples
            shards: list[list[int]] = [[] for _ in range(peers)]
            for label in np.unique(labels):
                members = rng.permutation(np.flatnonzero(labels == label))
                shares = rng.dirichlet(np.full(peers, alpha))
                cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
                for shard, part in zip(shards, np.split(members, cuts), strict=True):
                    shard.extend(part.tolist())
            if min(len(shard) for shard in shards) >= min_size:
                return [np.sort(np.array(shard, dtype=np.int64)) for shard in shards]
        raise ValueError(f"alpha {alpha} leaves some of {peers} peers under {min_size} examples")
    raise ValueError(f"scheme must be iid, dirichlet or quantity, not {scheme!r}")

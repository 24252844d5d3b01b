"""What every peer of a training job agrees on, grouped by concern.

:class:`JobSpec` names the job, its roster and its length (``rounds``), and holds one frozen
group per concern: :class:`DataSpec` (what data), :class:`TrainingSpec` (what model, trained
how on each peer), :class:`AveragingSpec` (how peers average), :class:`PrivacySpec`
(differential privacy), :class:`RobustnessSpec` (Byzantine-robust aggregation, and simulated
attackers to test it) and :class:`ProgressSpec` (stopping early, rolling back, checkpoints).
Each group checks its own fields when it is made; ``JobSpec`` checks only the rules that tie
groups together or to the roster. Market terms (budget, tier, peers) are not part of the job:
they are the order's (:mod:`meshfed.market.order`).

A job document (a job file, JSON between nodes) is a table: ``job_id``, ``roster``, ``rounds``
and one table per group (:meth:`JobSpec.to_json` writes that). The flat form that came before
the groups, every field at the top (``{"secure": false, "rounds": 3}``), is read as well:
:func:`grouped` moves each flat key into its group (the field names are the same), refusing
an unknown key by name and a key given both flat and in its group. :func:`flattened` goes the
other way, for readers of the flat form (a market RFQ carries it, which every version reads).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..averaging.groups import check_secure_grid
from ..averaging.robust import AGGREGATORS
from ..errors import ConfigError
from ..identity import PeerId
from ..privacy import policy as dp_policy
from ..secagg.ring import check_capacity
from .checkpoints import ProgressPolicy
from .data import BUNDLED, OwnData
from .jobfile import check_types, from_mapping, read_document

__all__ = [
    "GROUPS",
    "AveragingSpec",
    "DataSpec",
    "JobSpec",
    "PrivacySpec",
    "ProgressSpec",
    "RobustnessSpec",
    "TrainingSpec",
    "flattened",
    "grouped",
]


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """The data a job trains on.

    Attributes:
        dataset: a bundled data set (``digits``, ``synthetic``), partitioned among the roster,
            or the name of a data set each roster peer registered itself (:mod:`meshfed.data`),
            which it trains on where it is (``partition`` and ``alpha`` do not apply).
        partition, alpha: how a bundled data set is cut into shards (:mod:`.data`).
        own_data: how peers use their own data sets (:class:`~.data.OwnData`: the validation
            share each holds out, the weight cap); only with a registered data set.
    """

    dataset: str = "digits"
    partition: str = "dirichlet"
    alpha: float = 0.5
    own_data: OwnData = field(default_factory=OwnData)

    def __post_init__(self) -> None:
        check_types(self)
        if not self.own and self.own_data != OwnData():
            raise ConfigError(
                f"own_data is for data sets the peers registered, not the bundled {self.dataset}"
            )

    @property
    def own(self) -> bool:
        """Whether each peer trains on its own registered copy of :attr:`dataset`."""
        return self.dataset not in BUNDLED


@dataclass(frozen=True, kw_only=True)
class TrainingSpec:
    """The model, and how each peer trains it between averages.

    Attributes:
        model, model_options: the architecture (:func:`..models.build`).
        epochs, batch_size, lr, optimizer (``sgd`` or ``adam``): local training per round.
        local_steps: if > 0, each round trains this many minibatch steps instead of ``epochs``
            passes (push-sum: one or a few steps per tick, as SGP does).
        algorithm, algorithm_options: the strategy (:func:`..strategies.named`).
        seed: model initialization and data split.
    """

    model: str = "mlp"
    model_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 1
    local_steps: int = 0
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    algorithm: str = "fedavg"
    algorithm_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        if self.epochs < 1 or self.local_steps < 0:
            raise ConfigError("epochs must be at least 1, local_steps at least 0")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"optimizer: must be sgd or adam, not {self.optimizer!r}")
        if not (self.batch_size >= 1 and self.lr > 0):
            raise ConfigError("batch_size must be at least 1 and lr > 0")


@dataclass(frozen=True, kw_only=True)
class AveragingSpec:
    """How the peers average their models.

    Attributes:
        secure: average with secure aggregation (else a plain butterfly).
        collusion: how many members of a secure group may collude (SPEC 7b.7); thresholds
            resist it, and grids whose groups are too small for it are refused.
        schedule: ``exact`` (all grid axes every round: identical models), ``moshpit`` (one
            axis per round) or ``pushsum`` (asynchronous push-sum gossip, no groups: each
            "round" is one local step and one push; plain, for meshes with heavy churn).
        max_group: the largest averaging group (2..128).
        clip, levels_bits: quantization for secure averaging: parameters are clipped to
            ``[-clip, clip]`` and quantized to ``2^levels_bits`` levels.
        gossip_pushes: pushes per local step in ``pushsum`` (0: ``ceil(log2 n)``, one sweep
            of the exponential graph).
        gossip_staleness: in ``pushsum``, how many ticks a peer may run ahead of the peers
            that push to it (it waits for them, at most the aggregator's ``join_s``; one still
            silent is presumed gone until it pushes again): without a bound, fast peers finish
            early and slow ones spend their last ticks training alone on their own shard.
        compression: how group means travel (:mod:`..averaging.compression`): ``none``,
            ``fp16`` or ``int8`` (plain: the butterfly's slices), ``topk`` (plain: the round's
            update with error feedback, by an all-gather); with ``secure``, ``int8`` averages
            the round's update, clipped to ``[-clip, clip]``, in 8 bits in Z_2^16. ``topk``
            and secure ``int8`` average updates, so they need the ``exact`` schedule.
        topk_ratio: the share of the update's entries ``topk`` sends each step.
    """

    secure: bool = True
    collusion: int = 1
    schedule: str = "exact"
    max_group: int = 32
    clip: float = 8.0
    levels_bits: int = 20
    gossip_pushes: int = 0
    gossip_staleness: int = 2
    compression: str = "none"
    topk_ratio: float = 0.01

    def __post_init__(self) -> None:
        check_types(self)
        if self.schedule not in ("exact", "moshpit", "pushsum"):
            raise ConfigError(f"schedule must be exact, moshpit or pushsum, not {self.schedule!r}")
        if self.schedule == "pushsum" and self.secure:
            raise ConfigError("pushsum gossip is plain averaging: set secure=false, robust=none")
        if self.gossip_staleness < 1:
            raise ConfigError("gossip_staleness must be >= 1 (0 would make every peer wait)")
        if not 2 <= self.max_group <= 128:
            raise ConfigError("max_group must be in 2..128")
        self._check_compression()
        try:
            check_capacity(self.max_group, self.levels_bits, 32)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def averages_updates(self) -> bool:
        """Whether groups average the round's update ``x - base`` (``topk``, secure ``int8``)
        rather than the models."""
        return self.compression == "topk" or (self.secure and self.compression == "int8")

    def _check_compression(self) -> None:
        if self.compression not in ("none", "fp16", "int8", "topk"):
            raise ConfigError(
                f"compression must be none, fp16, int8 or topk, not {self.compression!r}"
            )
        if self.secure and self.compression not in ("none", "int8"):
            raise ConfigError(
                f"{self.compression} cannot be summed inside secure aggregation's masks (top-k "
                "would also leak which coordinates a peer sends): use int8, or secure=false"
            )
        if self.compression != "none" and self.schedule == "pushsum":
            raise ConfigError("compression is for group means: not with pushsum or robust")
        if self.averages_updates and self.schedule != "exact":
            raise ConfigError(
                f"compression={self.compression} averages updates, which keeps the models "
                "together only if every group starts from the same model: use schedule=exact"
            )
        if not 0 < self.topk_ratio <= 1:
            raise ConfigError(f"topk_ratio must be in (0, 1], not {self.topk_ratio}")
        if self.secure and self.compression == "int8":
            try:
                check_capacity(self.max_group, 8, 16)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None


@dataclass(frozen=True, kw_only=True)
class PrivacySpec:
    """Differential privacy (off while ``dp_clip`` is 0).

    Attributes:
        dp_clip: the L2 bound of what ``dp_mode`` clips (0: off).
        dp_mode: ``update`` (peer-level DP-FedAvg: each round's update is clipped and noised,
            then every peer weighs the same) or ``sample`` (example-level DP-SGD in local
            training: each example's gradient is clipped, each step's sum noised).
        dp_noise_multiplier: noise std on a group sum (``update``) or on a step's gradient sum
            (``sample``), in units of ``dp_clip``. With ``sample``, 0 lets each peer take the
            least noise with which all ``rounds`` of its DP-SGD fit ``dp_epsilon``.
        dp_epsilon, dp_delta: each peer's budget for the whole job; a peer whose next round
            would exceed it stops contributing its data.
    """

    dp_clip: float = 0.0
    dp_mode: str = "update"
    dp_noise_multiplier: float = 1.0
    dp_epsilon: float = 8.0
    dp_delta: float = 1e-5

    def __post_init__(self) -> None:
        check_types(self)
        auto_noise = self.dp_mode == "sample" and self.dp_noise_multiplier == 0
        if self.dp_clip < 0 or (self.dp_clip and not (self.dp_noise_multiplier > 0 or auto_noise)):
            raise ConfigError("dp_clip must be >= 0, and dp_noise_multiplier > 0 with it")
        if self.dp_mode not in ("update", "sample"):
            raise ConfigError(f"dp_mode must be update or sample, not {self.dp_mode!r}")
        if self.dp_clip and (not self.dp_epsilon > 0 or not 0 < self.dp_delta < 1):
            raise ConfigError("differential privacy needs dp_epsilon > 0 and 0 < dp_delta < 1")


@dataclass(frozen=True, kw_only=True)
class RobustnessSpec:
    """Byzantine-robust aggregation, and the simulated attackers that test it.

    Attributes:
        robust, robust_options: robust aggregation instead of the mean (``median``,
            ``trimmed_mean``, ``krum``, ``centered_clip``: :mod:`..averaging.robust`), over an
            all-gather of the group; it needs the individual models, so not with ``secure``.
        attackers, attack, attack_scale: chaos for robustness tests: the peers at these roster
            positions send ``base + f (x - base)`` with ``f = -attack_scale`` (``sign_flip``)
            or ``attack_scale`` (``scale``) instead of their trained model ``x``.
    """

    robust: str = "none"
    robust_options: dict[str, Any] = field(default_factory=dict)
    attackers: tuple[int, ...] = ()
    attack: str = "sign_flip"
    attack_scale: float = 10.0

    def __post_init__(self) -> None:
        check_types(self)
        if self.robust != "none" and self.robust not in AGGREGATORS:
            raise ConfigError(f"robust must be none or one of {', '.join(AGGREGATORS)}")
        if self.attack not in ("sign_flip", "scale") or any(i < 0 for i in self.attackers):
            raise ConfigError("attack is sign_flip or scale, attackers are roster positions")


@dataclass(frozen=True, kw_only=True)
class ProgressSpec:
    """When a job stops early or rolls back, and the checkpoints it keeps.

    Attributes:
        target_accuracy, patience, min_delta: stop once the test accuracy reaches the target
            (0: off), or after ``patience`` rounds without beating it by ``min_delta`` (0: off).
        rollback_drop, rollback_rounds: reload the best checkpoint after ``rollback_rounds``
            rounds below the best accuracy minus ``rollback_drop`` (0: off; needs a store).
        keep_checkpoints: the last checkpoints a store keeps (besides the best one).
    """

    target_accuracy: float = 0.0
    patience: int = 0
    min_delta: float = 0.0
    rollback_drop: float = 0.0
    rollback_rounds: int = 3
    keep_checkpoints: int = 3

    def __post_init__(self) -> None:
        check_types(self)
        if self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints must be at least 1")
        self.policy()  # its own checks

    def policy(self) -> ProgressPolicy:
        """A fresh policy with these convergence and rollback settings."""
        return ProgressPolicy(
            target_accuracy=self.target_accuracy,
            patience=self.patience,
            min_delta=self.min_delta,
            rollback_drop=self.rollback_drop,
            rollback_rounds=self.rollback_rounds,
        )


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A training job, as every peer of its roster sees it.

    Attributes:
        job_id: unique name (binds every message and mask of the job).
        roster: the peers, as peer id strings; shard ``i`` of the data goes to peer ``i``.
        rounds: how many rounds the job runs (fewer if :attr:`progress` stops it early).
        data, training, averaging, privacy, robustness, progress: the groups (see each).
    """

    job_id: str
    roster: tuple[str, ...]
    rounds: int = 10
    data: DataSpec = field(default_factory=DataSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    averaging: AveragingSpec = field(default_factory=AveragingSpec)
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    robustness: RobustnessSpec = field(default_factory=RobustnessSpec)
    progress: ProgressSpec = field(default_factory=ProgressSpec)

    def __post_init__(self) -> None:
        check_types(self)  # first: the rules below compare values of the declared types
        averaging, privacy, robustness = self.averaging, self.privacy, self.robustness
        if len(self.roster) < 2 or len(set(self.roster)) != len(self.roster):
            raise ConfigError("a job's roster lists at least 2 distinct peers")
        if self.rounds < 1:
            raise ConfigError("rounds must be at least 1")
        if robustness.robust != "none":
            if averaging.schedule == "pushsum":
                raise ConfigError(
                    "pushsum gossip is plain averaging: set secure=false, robust=none"
                )
            if averaging.secure:
                raise ConfigError(
                    "robust aggregation needs the individual models, which secure aggregation "
                    "hides: set secure=false (inside secure groups, bound updates with dp_clip)"
                )
            if averaging.compression != "none":
                raise ConfigError("compression is for group means: not with pushsum or robust")
        if averaging.secure:
            check_secure_grid(len(self.roster), averaging.max_group, averaging.collusion)
        if not all(i < len(self.roster) for i in robustness.attackers):
            raise ConfigError("attack is sign_flip or scale, attackers are roster positions")
        if privacy.dp_clip and privacy.dp_mode == "sample":
            if self.training.optimizer != "sgd":
                raise ConfigError("DP-SGD (dp_mode sample) trains with optimizer sgd")
            if self.training.local_steps:
                raise ConfigError(
                    "DP-SGD's steps follow from epochs (its sampling): no local_steps"
                )
        dp_policy.check(self)  # differential privacy that holds (privacy/policy.py)
        try:
            for peer in self.roster:
                PeerId.from_string(peer)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def to_json(self) -> str:
        """The job as JSON, one table per group (what :meth:`from_json` reads)."""
        return json.dumps({**asdict(self), "roster": list(self.roster)}, indent=2)

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> JobSpec:
        """The job in ``document``, grouped or flat (:func:`grouped`).

        Raises:
            ConfigError: unknown keys (with the closest known one), a key given both flat and
                in its group, a missing required field (``job_id``, ``roster``), wrong types
                or invalid values, each named.
        """
        return from_mapping(cls, grouped(document))

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        """Read a job written by :meth:`to_json`, or by hand, grouped or flat
        (:meth:`from_document`).

        Raises:
            ConfigError: not JSON, or as :meth:`from_document`.
        """
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"not a job description: {exc}") from None
        return cls.from_document(document)

    @classmethod
    def from_file(cls, path: Path) -> JobSpec:
        """Read a job file: JSON, or TOML if its name ends in ``.toml``
        (``examples/job.toml`` shows every field with its default, grouped).

        Raises:
            ConfigError: as :meth:`from_document`, the message starting with the file name.
        """
        document = read_document(path)
        try:
            return cls.from_document(document)
        except ConfigError as exc:
            raise ConfigError(f"job file {path}: {exc}") from None


#: the groups of a job document, by key
GROUPS: dict[str, type] = {
    "data": DataSpec,
    "training": TrainingSpec,
    "averaging": AveragingSpec,
    "privacy": PrivacySpec,
    "robustness": RobustnessSpec,
    "progress": ProgressSpec,
}
#: the keys a job document holds besides its groups
_TOP = tuple(f.name for f in dataclasses.fields(JobSpec) if f.name not in GROUPS)
#: each flat key (a field of the flat form) and the group it belongs to
_FLAT = {f.name: key for key, group in GROUPS.items() for f in dataclasses.fields(group)}


def grouped(document: Mapping[str, Any]) -> dict[str, Any]:
    """``document`` (a job's table, flat, grouped or both) with every flat key moved into its
    group's table; what is already grouped is left for :func:`.jobfile.from_mapping`.

    Raises:
        ConfigError: not a table, an unknown key (with the closest known one), a group that
            is not a table, or a key given both flat and in its group.
    """
    if not isinstance(document, Mapping):
        raise ConfigError(f"expected a table of job fields, got {type(document).__name__}")
    result: dict[str, Any] = {}
    moved: dict[str, dict[str, Any]] = {}
    for key, value in document.items():
        if key in _FLAT:
            moved.setdefault(_FLAT[key], {})[key] = value
        elif key in _TOP or key in GROUPS:
            result[key] = value
        else:
            raise _unknown(key, [*_TOP, *GROUPS, *_FLAT], listed=[*_TOP, *GROUPS])
    for key, flat in moved.items():
        table = result.get(key, {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"{key}: expected a table, got {table!r}")
        both = sorted(set(flat) & set(table))
        if both:
            raise ConfigError(f"{both[0]}: given both flat and in {key}; give it once")
        result[key] = {**table, **flat}
    return result


def flattened(document: Mapping[str, Any]) -> dict[str, Any]:
    """``document`` (flat, grouped or both) in the flat form: every group's fields at the top.

    Raises:
        ConfigError: as :func:`grouped`, or a group's table holds a key that is not one of
            its fields (``data.secure`` would otherwise pass as ``averaging``'s).
    """
    result = grouped(document)
    for key, group in GROUPS.items():
        table = result.pop(key, {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"{key}: expected a table, got {table!r}")
        names = [f.name for f in dataclasses.fields(group)]
        for name in table:
            if name not in names:
                raise _unknown(f"{key}.{name}", names)
        result.update(table)
    return result


def _unknown(key: str, known: list[str], listed: list[str] | None = None) -> ConfigError:
    """An unknown key's error, with the closest of ``known``, else ``listed`` (or all)."""
    close = difflib.get_close_matches(str(key).rpartition(".")[2], known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(listed or known)}"
    return ConfigError(f"{key}: unknown job field; {hint}")

"""The checks every data set passes before it is registered, and the digests it is known by.

:func:`checked` turns features and labels from any source into what training takes (float32
features of at least one axis per example, int64 labels in ``[0, classes)``), or refuses them
with a :class:`~meshfed.errors.DataError` naming the source and the problem. :func:`label_digest`
is what a peer's record says about its labels; :func:`validation_split` is the local split a
peer holds out, the same every time for the same name and file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import DataError
from ..membership.records import MAX_FEATURE_AXES, MAX_FEATURE_LEN

__all__ = ["checked", "file_digest", "label_digest", "validation_split"]

_LABEL_DOMAIN = b"meshfed-label-set-v1"
_SPLIT_DOMAIN = b"meshfed-validation-split-v1"
#: the most label values a data set may declare
MAX_CLASSES = 2**31 - 1


def checked(
    x: Any, y: Any, *, source: str, classes: int | None = None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], int]:
    """``(x, y, classes)`` ready for training: ``x`` float32 of shape ``(examples, ...)``,
    ``y`` int64 labels in ``[0, classes)``; ``classes`` is the largest label + 1 unless given.

    Raises:
        DataError: ``"<source>: <problem>"``: x with fewer than 2 axes or more than
            :data:`MAX_FEATURE_AXES` feature axes, y not 1-D, their lengths differ, fewer than
            2 examples, features not numbers or not finite (NaN, inf), labels not integers,
            negative, or not below ``classes``.
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 2:
        raise DataError(f"{source}: x has shape {x.shape}; expected (examples, features...)")
    if x.ndim - 1 > MAX_FEATURE_AXES or max(x.shape[1:]) > MAX_FEATURE_LEN or 0 in x.shape[1:]:
        raise DataError(
            f"{source}: x has shape {x.shape}; an example has 1 to {MAX_FEATURE_AXES} feature "
            f"axes, each 1 to {MAX_FEATURE_LEN} long"
        )
    if y.ndim != 1:
        raise DataError(f"{source}: y has shape {y.shape}; expected one label per example")
    if len(x) != len(y):
        raise DataError(f"{source}: x has {len(x)} examples but y has {len(y)} labels")
    if len(y) < 2:
        raise DataError(f"{source}: {len(y)} example(s); a data set needs 2 or more")
    if x.dtype.kind not in "biuf":
        raise DataError(f"{source}: features of type {x.dtype} are not numbers")
    features = x.astype(np.float32)
    if not np.isfinite(features).all():
        bad = int(np.count_nonzero(~np.isfinite(features).reshape(len(features), -1).all(1)))
        raise DataError(f"{source}: {bad} example(s) have NaN or infinite features")
    labels = _integral(y, source)
    if labels.min() < 0:
        raise DataError(f"{source}: labels out of range: {int(labels.min())} is negative")
    top = int(labels.max())
    if classes is None:
        classes = top + 1
    if not 1 <= classes <= MAX_CLASSES:
        raise DataError(f"{source}: classes must be in 1..{MAX_CLASSES}, not {classes}")
    if top >= classes:
        raise DataError(
            f"{source}: labels out of range: {top} is not below the declared {classes} classes"
        )
    return features, labels, classes


def _integral(y: npt.NDArray[Any], source: str) -> npt.NDArray[np.int64]:
    """``y`` as int64, if every label is a whole number."""
    if y.dtype.kind in "iu":
        if y.dtype.kind == "u" and y.size and int(y.max()) > np.iinfo(np.int64).max:
            raise DataError(f"{source}: labels out of range: {int(y.max())}")
        return y.astype(np.int64)
    if y.dtype.kind == "b":
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or not (y == np.round(y)).all():
            bad = y[~(np.isfinite(y) & (y == np.round(y)))][0]
            raise DataError(f"{source}: labels are not integers (e.g. {bad})")
        if np.abs(y).max() >= 2**53:
            raise DataError(f"{source}: labels out of range: {y.max()}")
        return y.astype(np.int64)
    raise DataError(f"{source}: labels of type {y.dtype} are not integers")


def label_digest(labels: npt.NDArray[np.int64], classes: int) -> bytes:
    """SHA-256 of the set of label values held (and the declared class count):
    ``SHA-256("meshfed-label-set-v1" || u32be(classes) || i64le(sorted distinct labels))``.
    Two peers holding the same labels show the same digest. It hides nothing from someone
    who tries the label sets a class count allows; it says which, never how many."""
    present = np.unique(labels).astype("<i8")
    return hashlib.sha256(_LABEL_DOMAIN + classes.to_bytes(4, "big") + present.tobytes()).digest()


def file_digest(path: Path) -> bytes:
    """SHA-256 of the file's bytes.

    Raises:
        DataError: the file cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with path.open("rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise DataError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    return digest.digest()


def validation_split(
    name: str, digest: bytes, examples: int, fraction: float
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``(train, validation)`` indices of a data set of ``examples``: a share ``fraction`` held
    out (at least one example, and at least one left to train on), drawn from a permutation
    seeded by SHA-256 of the data set's name and file digest, so it is the same at every load.

    Raises:
        DataError: ``fraction`` not in (0, 1), or fewer than 2 examples.
    """
    if not 0 < fraction < 1:
        raise DataError(f"data set {name!r}: validation share {fraction} not in (0, 1)")
    if examples < 2:
        raise DataError(f"data set {name!r}: {examples} example(s) cannot be split")
    seed = hashlib.sha256(_SPLIT_DOMAIN + name.encode() + digest).digest()
    order = np.random.default_rng(int.from_bytes(seed[:8], "big")).permutation(examples)
    held = min(examples - 1, max(1, round(fraction * examples)))
    return np.sort(order[held:]), np.sort(order[:held])

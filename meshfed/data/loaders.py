"""Reading a data set's examples from where it lives: ``.npz`` files (arrays ``x`` and ``y``),
CSV files with a label column, and map-style datasets in memory (a torch ``Dataset`` yielding
``(features, label)``).

Every reader returns the raw ``(x, y)`` arrays or raises :class:`~meshfed.errors.DataError`
naming the file (line and column for CSV) and the problem; the range and shape checks come
after, in :func:`.validation.checked`. Image folders are not read: they need Pillow, which
meshfed does not depend on (convert them to a ``.npz`` of ``x`` and ``y``).
"""

from __future__ import annotations

import csv
import io
import math
import operator
import struct
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import DataError

__all__ = ["FORMATS", "format_of", "read_csv", "read_items", "read_npz", "read_file"]

#: the file formats a node registers, by the suffix that names them
FORMATS = {".npz": "npz", ".csv": "csv"}

Arrays = tuple[npt.NDArray[Any], npt.NDArray[Any]]


def format_of(path: Path) -> str:
    """The format of the file at ``path``, by its suffix.

    Raises:
        DataError: a missing file, a folder, or a suffix that is not ``.npz`` or ``.csv``.
    """
    if path.is_dir():
        raise DataError(
            f"{path}: a folder; image folders need Pillow, which meshfed does not install: "
            "save the images as a .npz of x (examples, channels, height, width) and y"
        )
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise DataError(f"{path}: unknown format {path.suffix!r}: use .npz or .csv") from None


def read_file(path: Path, content: bytes, format: str, options: dict[str, Any]) -> Arrays:
    """The examples in ``content``, the bytes of the file at ``path`` (named in errors), in
    ``format`` (``npz``, or ``csv`` with ``options["label_column"]``).

    Raises:
        DataError: as the reader of that format.
    """
    if format == "npz":
        return read_npz(path, content)
    if format == "csv":
        return read_csv(path, content, label_column=options.get("label_column"))
    raise DataError(f"{path}: unknown format {format!r}")


def read_npz(path: Path, content: bytes) -> Arrays:
    """Arrays ``x`` and ``y`` of ``content``, a ``.npz`` file read from ``path`` (never
    unpickling anything).

    Raises:
        DataError: unreadable, truncated or corrupt, holding pickled objects, or without ``x``
            or ``y``.
    """
    try:
        archive = np.load(io.BytesIO(content), allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: a single .npy array, not a .npz archive of x and y")
        with archive:
            missing = [key for key in ("x", "y") if key not in archive.files]
            if missing:
                held = ", ".join(archive.files) or "none"
                raise DataError(
                    f"{path}: no array {' or '.join(missing)}; a .npz data set holds x "
                    f"(features) and y (labels), this one holds {held}"
                )
            for key in ("x", "y"):
                _check_size(path, archive, key)
            return archive["x"], archive["y"]
    except DataError:
        raise
    except (
        OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError,
        RuntimeError, struct.error,
    ) as exc:  # fmt: skip  # zipfile's and numpy's answers to bytes they cannot take
        # (RuntimeError: a member flagged encrypted)
        raise DataError(f"{path}: not a readable .npz (truncated or corrupt): {exc}") from None


def _check_size(path: Path, archive: np.lib.npyio.NpzFile, key: str) -> None:
    """Refuse array ``key`` if its header claims more bytes than the archive stores for it
    (a corrupt header must not make us allocate them)."""
    zipped = archive.zip
    assert zipped is not None  # an archive np.load just opened
    info = zipped.getinfo(f"{key}.npy")
    with zipped.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    claimed = dtype.itemsize * math.prod(shape)
    if claimed > info.file_size:
        raise DataError(
            f"{path}: array {key} claims shape {shape} of {dtype} ({claimed} bytes) but "
            f"{info.file_size} bytes are stored (truncated or corrupt)"
        )


def read_csv(path: Path, content: bytes, *, label_column: str | int | None = None) -> Arrays:
    """Features and labels of ``content``, a CSV file (UTF-8) read from ``path``: every
    column but the label column is a feature.

    The first row is a header if any of its cells is not a number. ``label_column`` is a
    header name or a column index (negative counts from the end); by default the column
    named ``label`` if the header has one, else the last column.

    Raises:
        DataError: not UTF-8 text or empty, no such label column, rows of different lengths, or a
            cell that is not a number (naming its line and column).
    """
    try:
        rows = csv.reader(io.StringIO(content.decode("utf-8-sig"), newline=""))
        lines = [(n, row) for n, row in enumerate(rows, start=1) if row]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read it as CSV: {exc}") from None
    if not lines:
        raise DataError(f"{path}: no rows")
    header: list[str] | None = None
    if not all(_is_number(cell) for cell in lines[0][1]):
        header = [cell.strip() for cell in lines[0][1]]
        lines = lines[1:]
    width = len(header) if header is not None else len(lines[0][1]) if lines else 0
    column = _label_index(path, header, width, label_column)
    for number, row in lines:
        if len(row) != width:
            raise DataError(f"{path}, line {number}: {len(row)} cells, expected {width}")
    body = [row for _, row in lines]
    try:
        table = np.array(body, dtype=np.float64).reshape(len(body), width)
    except ValueError:
        for number, row in lines:  # again, to name the cell
            for index, cell in enumerate(row):
                if not _is_number(cell):
                    name = f"{header[index]!r}" if header else str(index)
                    raise DataError(
                        f"{path}, line {number}, column {name}: {cell!r} is not a number"
                    ) from None
        raise
    return np.delete(table, column, axis=1), table[:, column]


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _label_index(
    path: Path, header: list[str] | None, width: int, label_column: str | int | None
) -> int:
    """The label column's index in rows of ``width`` cells."""
    if width < 2:
        raise DataError(f"{path}: {width} column(s); a data set needs features and a label")
    if label_column is None:
        return header.index("label") if header is not None and "label" in header else width - 1
    if isinstance(label_column, str):
        if header is None or label_column not in header:
            has = f"the header has {', '.join(header)}" if header else "there is no header row"
            raise DataError(f"{path}: no label column {label_column!r}; {has}")
        return header.index(label_column)
    if not -width <= label_column < width:
        raise DataError(f"{path}: no label column {label_column}; rows have {width} columns")
    return label_column % width


def read_items(items: Sequence[Any], *, source: str) -> Arrays:
    """Features and labels of a map-style dataset (``len`` and ``[i]``, e.g. a torch
    ``Dataset``) whose items are ``(features, integer label)``.

    Raises:
        DataError: an item that is not such a pair, a label that is not an integer, or
            examples of different shapes.
    """
    features, labels = [], []
    for index in range(len(items)):
        item = items[index]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise DataError(f"{source}: item {index} is not a (features, label) pair")
        value, label = item
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        features.append(np.asarray(value))
        try:
            labels.append(operator.index(label))
        except TypeError:
            raise DataError(f"{source}: item {index}'s label {label!r} is not an integer") from None
    shapes = {f.shape for f in features}
    if len(shapes) > 1:
        raise DataError(f"{source}: examples of different shapes {sorted(shapes)[:3]}")
    if not features:
        raise DataError(f"{source}: no examples")
    return np.stack(features), np.array(labels, dtype=np.int64)

"""Registering a node's own data: bad data is refused naming the file and the problem, good
data survives restarts bit for bit, and a file changed since is refused at load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from meshfed.data.loaders import read_csv, read_npz
from meshfed.data.registry import MAX_DATASETS, DataRegistry
from meshfed.errors import ConfigError, CorruptRecord, DataError
from meshfed.store import MIGRATIONS, Store


@pytest.fixture
def registry(tmp_path: Path) -> DataRegistry:
    return DataRegistry(Store.open(tmp_path / "store.sqlite3"), tmp_path / "datasets")


def examples(n: int = 40, features: int = 6, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    return rng.random((n, features), dtype=np.float32), np.arange(n) % classes


def npz(path: Path, **arrays: object) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_data_error_is_a_config_error() -> None:
    assert issubclass(DataError, ConfigError)


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        ({"x": np.zeros(10), "y": np.zeros(10, int)}, r"x has shape \(10,\); expected"),
        ({"x": np.zeros((10, 2)), "y": np.zeros((10, 1), int)}, "y has shape"),
        ({"x": np.zeros((10, 2)), "y": np.zeros(9, int)}, "x has 10 examples but y has 9"),
        ({"x": np.zeros((10, 2)), "y": np.arange(10) - 1}, "labels out of range: -1 is negative"),
        ({"x": np.zeros((10, 2)), "y": np.full(10, 0.5)}, "labels are not integers"),
        ({"x": np.full((10, 2), np.nan), "y": np.zeros(10, int)}, "10 example.s. have NaN"),
        ({"x": np.full((10, 2), np.inf), "y": np.zeros(10, int)}, "NaN or infinite"),
        ({"x": np.array([["a", "b"]] * 10), "y": np.zeros(10, int)}, "are not numbers"),
        ({"features": np.zeros((10, 2)), "y": np.zeros(10, int)}, "no array x; a .npz"),
    ],
)
def test_a_bad_npz_is_refused_naming_the_file_and_the_problem(
    registry: DataRegistry, tmp_path: Path, arrays: dict[str, object], problem: str
) -> None:
    path = npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=problem) as caught:
        registry.register("bad", path)
    assert str(caught.value).startswith(f"{path}: ")
    assert registry.list() == []  # nothing recorded


def test_labels_beyond_the_declared_classes_are_refused(
    registry: DataRegistry, tmp_path: Path
) -> None:
    x, y = examples(classes=4)
    path = npz(tmp_path / "four.npz", x=x, y=y)
    with pytest.raises(DataError, match=f"{path}: labels out of range: 3 is not below the "):
        registry.register("four", path, classes=3)
    assert registry.register("four", path, classes=10).classes == 10


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.6, 0.99])
def test_a_truncated_npz_is_refused_as_such(
    registry: DataRegistry, tmp_path: Path, keep: float
) -> None:
    x, y = examples(400)
    whole = npz(tmp_path / "whole.npz", x=x, y=y).read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(whole[: int(len(whole) * keep)])
    with pytest.raises(DataError, match=f"{cut}: not a readable .npz .truncated or corrupt."):
        registry.register("cut", cut)


def test_an_npz_claiming_more_than_it_holds_is_refused_before_allocating(
    registry: DataRegistry, tmp_path: Path
) -> None:
    import io
    import zipfile

    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        header = io.BytesIO()
        shape = {"descr": "<f8", "fortran_order": False, "shape": (2**36, 4)}
        np.lib.format.write_array_header_1_0(header, shape)  # 2 TiB, in a few bytes
        archive.writestr("x.npy", header.getvalue() + bytes(64))
        labels = io.BytesIO()
        np.save(labels, np.zeros(4, int))
        archive.writestr("y.npy", labels.getvalue())
    with pytest.raises(DataError, match=rf"{path}: array x claims shape \(68719476736, 4\)"):
        registry.register("huge", path)


def test_a_pickled_object_array_is_never_unpickled(registry: DataRegistry, tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([object()] * 4, dtype=object), y=np.zeros(4, int))
    with pytest.raises(DataError, match=f"{path}: not a readable .npz"):
        registry.register("objects", path)


@pytest.mark.parametrize(
    ("text", "column", "problem"),
    [
        ("a,b,label\n1,2,0\n3,4,1\n", "target", "no label column 'target'; the header has a, b"),
        ("1,2,0\n3,4,1\n", "target", "no label column 'target'; there is no header row"),
        ("1,2,0\n3,4,1\n", "7", "no label column 7; rows have 3 columns"),
        ("a,b,label\n1,2,0\n3,x,1\n", None, "line 3, column 'b': 'x' is not a number"),
        ("1,2,0\n3,4,1\n5,,1\n", None, "line 3, column 1: '' is not a number"),
        ("a,b,label\n1,2,0\n3,4\n", None, "line 3: 2 cells, expected 3"),
        ("a,b,label\n1,2,0\n3,4,2.5\n", None, "labels are not integers"),
        ("a,b,label\n1,nan,0\n3,4,1\n", None, "1 example.s. have NaN"),
        ("", None, "no rows"),
    ],
)
def test_a_bad_csv_is_refused_naming_the_file_and_the_problem(
    registry: DataRegistry, tmp_path: Path, text: str, column: str | None, problem: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    label = None if column is None else int(column) if column.isdigit() else column
    with pytest.raises(DataError, match=problem) as caught:
        registry.register("bad", path, label_column=label)
    assert str(caught.value).startswith(f"{path}")


def test_a_csv_label_column_by_name_by_index_or_by_default(
    registry: DataRegistry, tmp_path: Path
) -> None:
    path = tmp_path / "d.csv"
    path.write_text("kind,a,b\n1,0.5,2\n0,1.5,3\n1,2.5,4\n")
    record = registry.register("by-name", path, label_column="kind")
    assert (record.examples, record.feature_shape, record.classes) == (3, (2,), 2)
    train, held = registry.load("by-name", validation=0.34)
    both = np.concatenate([train.x, held.x])
    assert sorted(both[:, 0].tolist()) == [0.5, 1.5, 2.5]
    assert registry.register("by-index", path, label_column=0).label_digest == record.label_digest
    by_default = registry.register("last", path)  # the last column: labels 2, 3, 4
    assert by_default.classes == 5


def test_other_sources_and_names_are_refused(registry: DataRegistry, tmp_path: Path) -> None:
    x, y = examples()
    with pytest.raises(DataError, match="not a bundled name"):
        registry.register("digits", (x, y))
    with pytest.raises(DataError, match="1 to 64 letters"):
        registry.register("../escape", (x, y))
    with pytest.raises(DataError, match="a folder; image folders need Pillow"):
        registry.register("images", tmp_path)
    with pytest.raises(DataError, match=r"unknown format '\.txt'"):
        (tmp_path / "d.txt").write_text("1,2\n")
        registry.register("text", tmp_path / "d.txt")
    with pytest.raises(DataError, match="no such file"):
        registry.register("gone", tmp_path / "gone.npz")
    with pytest.raises(DataError, match=r"expected a file path, \(x, y\) arrays"):
        registry.register("number", 3)
    registry.register("taken", (x, y))
    with pytest.raises(DataError, match="registered already"):
        registry.register("taken", (x, y))


def test_a_node_registers_at_most_so_many_data_sets(registry: DataRegistry) -> None:
    x, y = examples(4)
    for index in range(MAX_DATASETS):
        registry.register(f"d{index}", (x, y))
    with pytest.raises(DataError, match=f"{MAX_DATASETS} data sets are registered"):
        registry.register("one-more", (x, y))


def test_arrays_and_files_survive_a_restart_bit_for_bit(tmp_path: Path) -> None:
    x, y = examples(50)
    path = npz(tmp_path / "file.npz", x=x.astype(np.float64), y=y.astype(np.int32))
    with Store.open(tmp_path / "store.sqlite3") as store:
        registry = DataRegistry(store, tmp_path / "datasets")
        registry.register("arrays", (x, y))
        registry.register("file", path)
        before = {name: registry.load(name) for name in ("arrays", "file")}
    with Store.open(tmp_path / "store.sqlite3") as store:  # a new process, the same files
        registry = DataRegistry(store, tmp_path / "datasets")
        assert [r.name for r in registry.list()] == ["arrays", "file"]
        for name, (train, held) in before.items():
            again_train, again_held = registry.load(name)
            assert np.array_equal(again_train.x, train.x) and again_train.x.dtype == np.float32
            assert np.array_equal(again_train.y, train.y) and again_train.y.dtype == np.int64
            assert np.array_equal(again_held.x, held.x) and np.array_equal(again_held.y, held.y)
            # together: every example once
            whole = np.concatenate([again_train.x, again_held.x])
            assert sorted(map(bytes, whole)) == sorted(map(bytes, x))
        assert store.schema_version == len(MIGRATIONS)


def test_the_validation_split_is_held_out_deterministically(registry: DataRegistry) -> None:
    x, y = examples(100)
    registry.register("a", (x, y))
    registry.register("b", (x, y))
    train, held = registry.load("a")
    assert (len(train), len(held)) == (80, 20)
    assert np.array_equal(registry.load("a")[1].x, held.x)
    assert not np.array_equal(registry.load("b")[1].x, held.x)  # seeded by name and digest
    assert len(registry.load("a", validation=0.5)[1]) == 50
    with pytest.raises(DataError, match=r"validation share 1.0 not in \(0, 1\)"):
        registry.load("a", validation=1.0)


def test_a_file_changed_after_registration_is_refused_until_registered_again(
    registry: DataRegistry, tmp_path: Path
) -> None:
    x, y = examples()
    path = npz(tmp_path / "d.npz", x=x, y=y)
    registry.register("d", path)
    npz(path, x=x + 1, y=y)
    with pytest.raises(DataError, match=f"{path}: changed since it was registered as 'd'"):
        registry.load("d")
    registry.register("d", path, replace=True)
    again = np.concatenate([part.x for part in registry.load("d")])
    assert np.array_equal(np.sort(again, axis=0), np.sort(x + 1, axis=0))
    path.unlink()
    with pytest.raises(DataError, match=f"{path}: cannot read it"):
        registry.load("d")


def test_remove_deletes_saved_arrays_but_never_a_users_file(
    registry: DataRegistry, tmp_path: Path
) -> None:
    x, y = examples()
    path = npz(tmp_path / "mine.npz", x=x, y=y)
    saved = registry.register("saved", (x, y))
    registry.register("mine", path)
    registry.remove("saved")
    registry.remove("mine")
    assert not Path(saved.path).exists() and path.exists()
    assert registry.list() == []
    with pytest.raises(DataError, match="no data set 'mine' on this node"):
        registry.remove("mine")


def test_a_tampered_registration_is_never_loaded(registry: DataRegistry, tmp_path: Path) -> None:
    x, y = examples()
    registry.register("d", (x, y))
    other = npz(tmp_path / "other.npz", x=x, y=y)
    with registry.store._write() as connection:  # someone edits the row, not its MAC
        connection.execute("UPDATE datasets SET path = ?", (str(other),))
    with pytest.raises(CorruptRecord, match="data set 'd' does not match its HMAC"):
        registry.load("d")
    assert registry.store.verify() == ["data set 'd' does not match its HMAC"]


class Items:
    """A map-style dataset as torch's: len and [i] -> (tensor, int label)."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        import torch

        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[object, object]:
        return self.x[index], self.y[index]


def test_a_torch_dataset_is_registered_as_arrays(registry: DataRegistry) -> None:
    x, y = examples(30)
    record = registry.register("torch", Items(x.reshape(30, 2, 3), y))
    assert record.feature_shape == (2, 3) and record.format == "npz"
    train, held = registry.load("torch")
    assert train.x.shape[1] == 6  # rows, flattened for the models
    assert sorted(map(bytes, np.concatenate([train.x, held.x]))) == sorted(map(bytes, x))
    floats = Items(x, y.astype(np.float32))
    with pytest.raises(DataError, match=r"data set 'floats': item 0's label .* is not an integer"):
        registry.register("floats", floats)


# -- the readers, on any input ---------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.tuples(st.integers(2, 20), st.integers(1, 5)), elements=finite),
    column=st.integers(0, 5),
    data=st.data(),
)
def test_csv_round_trip(x: np.ndarray, column: int, data: st.DataObject) -> None:
    y = data.draw(hnp.arrays(np.int64, len(x), elements=st.integers(0, 50)))
    column = min(column, x.shape[1])
    table = np.insert(x.astype(np.float64), column, y, axis=1)
    text = "\n".join(",".join(repr(float(v)) for v in row) for row in table)
    features, labels = read_csv(Path("t.csv"), text.encode(), label_column=column)
    assert np.array_equal(features.astype(np.float32), x)
    assert np.array_equal(labels.astype(np.int64), y)


@settings(max_examples=60, deadline=None)
@given(content=st.binary(max_size=2000))
def test_any_bytes_are_read_or_refused_as_data_errors(content: bytes) -> None:
    for path, read in ((Path("f.npz"), read_npz), (Path("f.csv"), read_csv)):
        try:
            read(path, content)
        except DataError as exc:
            assert str(exc).startswith(f"{path}")


@settings(max_examples=200, deadline=None)
@given(
    cut=st.integers(0, 10_000), flip=st.integers(0, 10_000), byte=st.integers(1, 255),
    compressed=st.booleans(),
)  # fmt: skip
def test_a_cut_or_flipped_npz_is_read_whole_or_refused(
    cut: int, flip: int, byte: int, compressed: bool
) -> None:
    import io

    x, y = examples(64)
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, x=x, y=y)
    content = bytearray(buffer.getvalue())
    content[flip % len(content)] ^= byte
    del content[len(content) - cut % len(content) :]
    try:
        got_x, got_y = read_npz(Path("f.npz"), bytes(content))
    except DataError as exc:
        assert str(exc).startswith("f.npz: ")
    else:  # a byte outside the arrays' data, or in a place no check covers
        assert got_x.shape == x.shape and got_y.shape == y.shape

"""attntrace's own .npz writer (inputs/npz_writer.py) against numpy and zipfile as readers."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest

from attntrace.inputs import npz_writer
from attntrace.inputs.npz_writer import NpzWriter
from attntrace.inputs.sources import read_npz_all


def arrays():
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(2, 3, 40, 40)).astype(np.float32)
    scores[0, 1, 3, 5:] = -np.inf
    scores[1, 0, 7, 2] = np.nan
    return {
        "attn.hook_attn_scores": scores,                           # -inf and NaN bit for bit
        "attn.hook_pattern": rng.random((1, 12, 64, 64)),          # several slices (see the fixture)
        "attn.hook_mask": np.tril(np.ones((1, 1, 9, 9), dtype=bool)),
        "attn.hook_z": rng.normal(size=(2, 5, 3, 4)).transpose(0, 2, 1, 3),    # a view: not C-contiguous
        "fortran": np.asfortranarray(rng.normal(size=(6, 7))),
        "ints": np.arange(-5, 5, dtype=np.int64).reshape(2, 5),
        "empty": np.zeros((0, 3)),
        "__name__": np.array("seed 002 · ABC"),                  # 0-d text, not ASCII
        "__tokens__": np.array(["机票", "the", "cat"]),
    }


@pytest.fixture
def small_slices(monkeypatch):
    monkeypatch.setattr(npz_writer, "SLICE_BYTES", 4096)      # many slices, the CRC on its own thread


def write(path, members):
    with open(path, "w+b") as stream:
        writer = NpzWriter(stream)
        for name, array in members.items():
            writer.add(name, array)
        writer.close()


def test_numpy_and_zipfile_read_every_member_exactly(tmp_path, small_slices):
    path = tmp_path / "t.npz"
    members = arrays()
    write(path, members)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None                      # every CRC-32 checks out
        assert archive.namelist() == [name + ".npy" for name in members]
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
    with np.load(path, allow_pickle=False) as loaded:
        assert loaded.files == list(members)
        for name, array in members.items():
            assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
            np.testing.assert_array_equal(loaded[name], array)
            assert loaded[name].tobytes() == np.ascontiguousarray(array).tobytes()    # NaN's bits too
    ours = read_npz_all(path)                                 # attntrace's own reader (diff, specs)
    assert set(ours) == set(members)
    np.testing.assert_array_equal(ours["attn.hook_pattern"], members["attn.hook_pattern"])


def test_a_damaged_member_fails_its_crc(tmp_path):
    path = tmp_path / "t.npz"
    write(path, {"a": np.arange(1000, dtype=np.float64)})
    raw = bytearray(path.read_bytes())
    raw[400] ^= 0xFF                                         # a byte of the data
    path.write_bytes(bytes(raw))
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() == "a.npy"


def test_the_same_bytes_as_numpy_savez_inside_each_member(tmp_path):
    """Member by member, what np.savez stores (the .npy bytes), for contiguous and strided arrays
    (a Fortran-order array numpy stores as such; we store every array in C order)."""
    members = {k: v for k, v in arrays().items() if not k.startswith("__") and k != "fortran"}
    ours, theirs = tmp_path / "ours.npz", tmp_path / "theirs.npz"
    write(ours, members)
    np.savez(theirs, **members)
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(theirs) as b:
        for name in members:
            assert a.read(name + ".npy") == b.read(name + ".npy")


def test_object_arrays_are_refused(tmp_path):
    with open(tmp_path / "t.npz", "w+b") as stream, pytest.raises(ValueError, match="without pickle"):
        NpzWriter(stream).add("objects", np.array([{"a": 1}], dtype=object))

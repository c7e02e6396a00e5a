"""Our safetensors reader against the ``safetensors`` package (and torch for bf16/f16), and on corrupt files."""
from __future__ import annotations

import builtins
import json
import os
import struct

import numpy as np
import pytest

from attntrace.errors import InputError
from attntrace.inputs.safetensors_io import SafetensorsFile, ShardedSafetensors, open_tensors

CI = os.environ.get("CI") == "true"


def _require(module):
    import importlib
    return importlib.import_module(module) if CI else pytest.importorskip(module)


def write_raw(path, header, data=b"", pad_to=8):
    """A safetensors file from a header dict and data bytes, written by hand (for corruptions)."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % pad_to)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def code_of(excinfo):
    return excinfo.value.diagnosis.code


def text_of(excinfo):
    d = excinfo.value.diagnosis
    return " ".join([d.message, d.hint or "", *d.details])


@pytest.fixture
def numpy_file(tmp_path):
    st = _require("safetensors.numpy")
    rng = np.random.default_rng(0)
    arrays = {
        "f64": rng.normal(size=(3, 4)), "f32": rng.normal(size=(5,)).astype(np.float32),
        "f16": rng.normal(size=(2, 3)).astype(np.float16), "i64": rng.integers(-9, 9, (4,)),
        "i32": rng.integers(-9, 9, (2, 2)).astype(np.int32), "i16": np.array([-3, 7], dtype=np.int16),
        "i8": np.array([-128, 127], dtype=np.int8), "u8": np.array([0, 255], dtype=np.uint8),
        "bool": np.array([True, False, True]), "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    path = tmp_path / "n.safetensors"
    st.save_file(arrays, str(path), metadata={"format": "np", "note": "test"})
    return path, arrays


def test_every_dtype_matches_safe_open(numpy_file):
    safetensors = _require("safetensors")
    path, arrays = numpy_file
    ours = SafetensorsFile(path)
    assert sorted(ours.names()) == sorted(arrays) and ours.metadata == {"format": "np", "note": "test"}
    with safetensors.safe_open(str(path), framework="np") as theirs:
        for name in arrays:
            expected = theirs.get_tensor(name)
            got = ours.read(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            np.testing.assert_array_equal(got, expected)
            assert ours.info(name).shape == tuple(expected.shape)


def test_float_conversions_and_read_only_views(numpy_file):
    path, arrays = numpy_file
    ours = SafetensorsFile(path)
    same = ours.read("f32", "float32")
    assert not same.flags.writeable and not same.flags.owndata      # a view onto the mapped file, no copy
    widened = ours.read("f16", "float64")
    assert widened.dtype == np.float64
    np.testing.assert_array_equal(widened, arrays["f16"].astype(np.float64))
    np.testing.assert_array_equal(ours.read("i64", "float32"), arrays["i64"].astype(np.float32))
    np.testing.assert_array_equal(ours.read_rows("f64", [2, 0], "float32"), arrays["f64"][[2, 0]].astype(np.float32))
    with pytest.raises(InputError) as e:
        ours.read("f32", "float16")
    assert code_of(e) == "ATT-E313"


def test_bfloat16_and_float16_against_torch(tmp_path):
    torch = _require("torch")
    st_torch = _require("safetensors.torch")
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(7, 5, generator=generator, dtype=torch.float64) * 100
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, 3.0e38, -1.5])
    tensors = {"bf": values.to(torch.bfloat16), "hf": values.to(torch.float16),
               "bf_special": special.to(torch.bfloat16), "hf_special": special.to(torch.float16)}
    path = tmp_path / "t.safetensors"
    st_torch.save_file(tensors, str(path))
    ours = SafetensorsFile(path)
    assert ours.info("bf").dtype == "BF16" and ours.info("hf").dtype == "F16"
    for name, tensor in tensors.items():
        for dtype, torch_dtype in (("float32", torch.float32), ("float64", torch.float64)):
            got = ours.read(name, dtype)
            assert got.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(got, tensor.to(torch_dtype).numpy())   # exact, signs and infinities too
    assert ours.read("bf").dtype == np.float32          # numpy has no bfloat16: None gives float32
    assert np.signbit(ours.read("bf_special", "float32")[1])


def test_each_file_opened_once(tmp_path, monkeypatch):
    st = _require("safetensors.numpy")
    shards = {"a.safetensors": {"x": np.ones(3, np.float32), "y": np.arange(4.0)},
              "b.safetensors": {"z": np.zeros((2, 2), np.float32)}}
    for file, arrays in shards.items():
        st.save_file(arrays, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {n: f for f, arrays in shards.items() for n in arrays}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(os.path.basename(str(f))) or
                        real_open(f, *a, **k))
    store = open_tensors(tmp_path / "model.safetensors.index.json")
    assert isinstance(store, ShardedSafetensors) and store.files_opened == []       # shards opened lazily
    np.testing.assert_array_equal(store.read("y"), np.arange(4.0))
    for _ in range(3):
        store.read("x"), store.read("z"), store.read_rows("y", [1])
    assert sorted(opened) == ["a.safetensors", "b.safetensors"]
    assert sorted(store.names()) == ["x", "y", "z"]


# --------------------------------------------------------------------------- corruption

GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}
DATA = np.arange(6, dtype="<f4").tobytes()


def test_handwritten_file_reads(tmp_path):
    f = SafetensorsFile(write_raw(tmp_path / "ok.safetensors", GOOD, DATA))
    np.testing.assert_array_equal(f.read("w"), [[0, 1], [2, 3]])
    np.testing.assert_array_equal(f.read("b"), [4, 5])


@pytest.mark.parametrize("header, data, code, words", [
    (GOOD, DATA[:20], "ATT-E307", ["'b'", "truncated"]),
    ({**GOOD, "b": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [16, 18]}}, DATA, "ATT-E305", ["F8_E4M3", "'b'"]),
    ({**GOOD, "b": {"dtype": "F32", "shape": [3], "data_offsets": [16, 24]}}, DATA, "ATT-E306", ["'b'", "12"]),
    ({**GOOD, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, DATA, "ATT-E308", ["'w'", "'b'"]),
    ({**GOOD, "b": {"dtype": "F32", "shape": [2], "data_offsets": [24, 16]}}, DATA, "ATT-E304", ["'b'"]),
    ({**GOOD, "b": {"dtype": "F32", "shape": [-2], "data_offsets": [16, 24]}}, DATA, "ATT-E304", ["'b'"]),
    ({**GOOD, "b": {"dtype": "F32", "shape": [2]}}, DATA, "ATT-E304", ["data_offsets"]),
    ({**GOOD, "__metadata__": {"n": 3}}, DATA, "ATT-E304", ["__metadata__"]),
])
def test_corrupt_headers_name_file_and_tensor(tmp_path, header, data, code, words):
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(InputError) as e:
        SafetensorsFile(path)
    assert code_of(e) == code
    text = text_of(e)
    assert "bad.safetensors" in text
    for word in words:
        assert word in text


def test_truncated_and_garbage_files(tmp_path):
    cases = {
        "short": (b"\x01\x02", "ATT-E301"),
        "huge_header": (struct.pack("<Q", 10 ** 12) + b"{}", "ATT-E302"),
        "header_past_end": (struct.pack("<Q", 100) + b'{"a": 1}', "ATT-E302"),
        "zero_header": (struct.pack("<Q", 0) + b"xx", "ATT-E302"),
        "not_json": (struct.pack("<Q", 5) + b"{oops", "ATT-E303"),
        "not_utf8": (struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc", "ATT-E303"),
        "json_list": (struct.pack("<Q", 2) + b"[]", "ATT-E303"),
        "duplicate": (struct.pack("<Q", 17) + b'{"a": {}, "a": 1}', "ATT-E303"),
    }
    for name, (raw, code) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(raw)
        with pytest.raises(InputError) as e:
            SafetensorsFile(path)
        assert code_of(e) == code, name
        assert f"{name}.safetensors" in text_of(e)
    with pytest.raises(InputError) as e:
        SafetensorsFile(tmp_path / "absent.safetensors")
    assert code_of(e) == "ATT-E300"


def test_a_real_checkpoint_cut_short(tmp_path, numpy_file):
    path, _ = numpy_file
    raw = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:-3])
    with pytest.raises(InputError) as e:
        SafetensorsFile(cut)
    assert code_of(e) == "ATT-E307" and "truncated" in text_of(e)


def test_unknown_tensor_name_suggests(tmp_path):
    f = SafetensorsFile(write_raw(tmp_path / "ok.safetensors", GOOD, DATA))
    with pytest.raises(InputError) as e:
        f.read("ww")
    assert code_of(e) == "ATT-E309" and "'w'" in text_of(e)
    with pytest.raises(InputError) as e:
        f.read_rows("w", [2])
    assert code_of(e) == "ATT-E309"


def test_sharded_index_errors(tmp_path):
    write_raw(tmp_path / "one.safetensors", GOOD, DATA)
    index = tmp_path / "model.safetensors.index.json"
    cases = [
        ("{not json", "ATT-E310"),
        (json.dumps({"metadata": {}}), "ATT-E310"),
        (json.dumps({"weight_map": {"w": "../one.safetensors"}}), "ATT-E310"),
        (json.dumps({"weight_map": {"w": "one.safetensors", "q": "two.safetensors"}}), "ATT-E311"),
    ]
    for text, code in cases:
        index.write_text(text)
        with pytest.raises(InputError) as e:
            open_tensors(index)
        assert code_of(e) == code, text
    index.write_text(json.dumps({"weight_map": {"w": "one.safetensors", "q": "one.safetensors"}}))
    store = open_tensors(index)
    np.testing.assert_array_equal(store.read("w"), [[0, 1], [2, 3]])
    with pytest.raises(InputError) as e:
        store.read("q")
    assert code_of(e) == "ATT-E312" and "'q'" in text_of(e) and "one.safetensors" in text_of(e)
    index.write_text(json.dumps({"weight_map": {"w": "one.safetensors", "q": "two.safetensors"}}))
    with pytest.raises(InputError) as e:
        open_tensors(index)
    assert "two.safetensors" in text_of(e) and "'q'" not in e.value.diagnosis.message

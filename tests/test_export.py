"""`run --export`: rendered (.svg .html .txt) and data (.json .npz) files, written atomically."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ABC  # noqa: E402
from conftest import ABC_X as X

from attntrace.inputs.files import atomic_write

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QK = [[10, 58, 106], [58, 234, 410], [106, 410, 714]]      # Q·Kᵀ worked out in test_seed_values.py


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_every_format_is_written(invoke, spec_path, tmp_path):
    names = ["t.svg", "t.html", "t.txt", "t.json", "t.npz"]
    args = ["run", spec_path]
    for name in names:
        args += ["--export", tmp_path / name]
    code, out = invoke(*args)
    assert code == 0, out
    assert "exported:" in out
    svg = (tmp_path / "t.svg").read_text(encoding="utf-8")
    assert svg.lstrip().startswith("<svg") and "scores" in svg
    html = (tmp_path / "t.html").read_text(encoding="utf-8")          # the offline explorer
    assert "<html" in html.lower() and "attntrace explorer" in html.lower()
    assert '"hook": "attn.hook_qk"' in html and '"max": "714.0"' in html          # exact values in its table
    assert "http://" not in html and "https://" not in html
    text = (tmp_path / "t.txt").read_text(encoding="utf-8")
    assert "attntrace · abc" in text and "\x1b[" not in text         # plain text, no escape codes
    assert leftovers(tmp_path) == []


def test_npz_holds_every_hook_and_loads_without_pickle(invoke, spec_path, tmp_path):
    target = tmp_path / "t.npz"
    assert invoke("run", spec_path, "--export", target)[0] == 0
    with np.load(target, allow_pickle=False) as saved:
        np.testing.assert_array_equal(saved["attn.hook_qk"][0, 0], QK)
        assert saved["__tokens__"].tolist() == ["A", "B", "C"]
        assert saved["__hooks__"].tolist()[:2] == ["hook_embed", "attn.hook_q"]
        assert str(saved["__name__"]) == "abc"


def test_json_holds_full_values(invoke, spec_path, tmp_path):
    target = tmp_path / "t.json"
    assert invoke("run", spec_path, "--export", target, "--format", "json")[0] == 0
    doc = json.loads(target.read_text(encoding="utf-8"))
    qk = doc["hooks"]["attn.hook_qk"]
    assert qk["values"] == [[QK]]


@pytest.mark.parametrize("config, keep", [("seed004_batch_multihead.yaml", "all"),
                                          ("seed001_encoder_layer.yaml", "all"),
                                          ("causal_gpt.yaml", "auto"), ("long_causal_300.yaml", "auto")])
def test_streamed_json_export_is_the_json_document_with_every_value(tmp_path, config, keep):
    """The export writes hook by hook and row by row; parsed, it is trace_to_json(values="full")."""
    import io

    import attntrace
    from attntrace.render.export import write_json_document
    from attntrace.render.json_view import trace_to_json
    from attntrace.render.output import jsonable
    trace = attntrace.run(str(CONFIGS / config), keep=keep)
    stream = io.BytesIO()
    write_json_document(stream, trace, {"expect": {"passed": True}})
    streamed = json.loads(stream.getvalue().decode("utf-8"))
    whole = json.loads(json.dumps(jsonable(dict(trace_to_json(trace, 0, values="full"),
                                                expect={"passed": True}))))
    assert streamed == whole
    kept = [hook for hook, entry in streamed["hooks"].items() if "values" in entry]
    assert trace.plan.steps[-1].hook in kept                # the output is always there in full
    for hook in kept:
        np.testing.assert_array_equal(np.array(streamed["hooks"][hook]["values"], dtype=float),
                                      trace.arrays[hook])


def test_json_export_includes_expectations(invoke, tmp_path):
    data = dict(ABC, expect={"scores": {"cell": ["B", "C"], "value": 400}})
    path = tmp_path / "hand.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    code, _ = invoke("run", path, "--export", tmp_path / "t.json")
    assert code == 1                                  # 400 is wrong: 9·21 + 13·17 = 410
    doc = json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))
    assert doc["expect"]["first_divergence"]["true"] == 410


def test_refuses_to_overwrite_the_spec_or_its_arrays(invoke, tmp_path):
    np.savez(tmp_path / "x.npz", X=np.array(X, dtype=float))
    data = dict(ABC, embeddings={"npz": "x.npz", "key": "X"})
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data), encoding="utf-8")
    before = (tmp_path / "x.npz").read_bytes()
    (tmp_path / "sub").mkdir()
    # the array file, also through another spelling of its path
    for target in (tmp_path / "x.npz", tmp_path / "sub" / ".." / "x.npz"):
        code, out = invoke("run", spec, "--export", target, "--format", "json")
        assert code == 2
        d = json.loads(out)["diagnoses"][0]
        assert d["code"] == "ATT-E064" and "input of this run" in d["message"]
    assert (tmp_path / "x.npz").read_bytes() == before


def test_refuses_to_overwrite_the_spec(invoke, tmp_path):
    spec = tmp_path / "spec.json"          # JSON is YAML: a spec may be a .json file
    spec.write_text(json.dumps(ABC), encoding="utf-8")
    code, out = invoke("run", spec, "--export", spec, "--format", "json")
    assert code == 2
    assert "input of this run" in json.loads(out)["diagnoses"][0]["message"]
    assert json.loads(spec.read_text(encoding="utf-8")) == ABC


def test_refuses_patch_files(invoke, spec_path, tmp_path):
    np.savez(tmp_path / "patch.npz", **{"attn.hook_v": np.zeros((1, 3, 1, 2))})
    code, out = invoke("run", spec_path, "--hook", f"V:patch={tmp_path / 'patch.npz'}",
                       "--export", tmp_path / "patch.npz", "--format", "json")
    assert code == 2
    assert "input of this run" in json.loads(out)["diagnoses"][0]["message"]


@pytest.mark.parametrize("name, words", [
    ("out.png", "unknown export format"),
    ("missing_folder/out.svg", "does not exist"),
])
def test_bad_targets_exit_2_before_running(invoke, spec_path, tmp_path, name, words):
    code, out = invoke("run", spec_path, "--export", tmp_path / name, "--format", "json")
    assert code == 2
    d = json.loads(out)["diagnoses"][0]
    assert d["code"] == "ATT-E064" and words in d["message"]


def test_folder_target_and_duplicates(invoke, spec_path, tmp_path):
    (tmp_path / "dir.svg").mkdir()
    assert invoke("run", spec_path, "--export", tmp_path / "dir.svg")[0] == 2
    assert invoke("run", spec_path, "--export", tmp_path / "a.txt", "--export", tmp_path / "a.txt")[0] == 2


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")
    os.chmod(target, 0o640)

    def explode(stream):
        stream.write(b"half")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        atomic_write(target, explode)
    assert target.read_text() == "old" and leftovers(tmp_path) == []
    atomic_write(target, lambda stream: stream.write(b"new"))
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640          # the replaced file's mode is kept


def big_spec(tmp_path):
    """One head over 1,500 tokens: the weights (2.25M values) and the output (1.05M) are packed."""
    rng = np.random.default_rng(2)
    for name, shape in (("x", (1500, 700)), ("w_q", (700, 4)), ("w_k", (700, 4)), ("w_v", (700, 4))):
        np.save(tmp_path / f"{name}.npy", rng.normal(size=shape).astype(np.float32))
    spec = tmp_path / "big.yaml"
    spec.write_text("version: 1\nembeddings: {npy: x.npy}\nattention:\n  heads: 1\n  mask: causal\n"
                    "  W_q: {npy: w_q.npy}\n  W_k: {npy: w_k.npy}\n  W_v: {npy: w_v.npy}\n"
                    "  W_o: {random: {shape: [4, 700], seed: 1}}\n")
    return spec


def test_big_arrays_go_to_the_npz_beside_the_json_bit_for_bit(invoke, tmp_path):
    import attntrace
    from attntrace.render.export import LIST_VALUES_LIMIT
    spec = big_spec(tmp_path)
    target = tmp_path / "big.json"
    code, out = invoke("run", spec, "--dtype", "float32", "--export", target)
    assert code == 0 and "big.npz" in out                # the file beside it is named among the exported
    document = json.loads(target.read_text(encoding="utf-8"))
    trace = attntrace.run(str(spec), dtype="float32", keep="all")      # the reference: every array kept
    referred = {hook: entry["values"] for hook, entry in document["hooks"].items()
                if isinstance(entry.get("values"), dict)}
    assert set(referred) == {hook for hook, array in trace.arrays.items() if array.size > LIST_VALUES_LIMIT}
    assert {"attn.hook_pattern", "hook_attn_out"} <= set(referred)
    assert all(value == {"npz": "big.npz", "key": hook} for hook, value in referred.items())
    with np.load(tmp_path / "big.npz", allow_pickle=False) as beside:          # the README's line of numpy
        assert sorted(beside.files) == sorted(referred)
        for hook in referred:
            np.testing.assert_array_equal(beside[hook], trace.arrays[hook])     # bit for bit, -inf included
            assert beside[hook].dtype == trace.arrays[hook].dtype
        assert np.isneginf(beside["attn.hook_attn_scores"]).any()
    from conftest import require

    from attntrace.schema import load_schema
    require("jsonschema").Draft202012Validator(load_schema()).validate(document)
    small = document["hooks"]["attn.hook_q"]["values"]
    assert isinstance(small, list)                       # 6,000 values: nested lists as before
    code, out = invoke("diff", target, spec, "--dtype", "float32")
    assert code == 0 and "agree" in out                  # diff reads the arrays beside it
    assert leftovers(tmp_path) == []


def test_a_json_and_npz_of_one_name_share_the_archive(invoke, tmp_path):
    """--export t.json --export t.npz: one .npz holding every array; the JSON refers to it for the big ones."""
    import attntrace
    spec = big_spec(tmp_path)
    code, _ = invoke("run", spec, "--dtype", "float32", "--export", tmp_path / "t.json", "--export", tmp_path / "t.npz")
    assert code == 0
    trace = attntrace.run(str(spec), dtype="float32", keep="all")
    with np.load(tmp_path / "t.npz", allow_pickle=False) as saved:
        assert [str(h) for h in saved["__hooks__"]] == list(trace.plan.hooks)
        for hook in trace.plan.hooks:
            np.testing.assert_array_equal(saved[hook], trace.arrays[hook])
    document = json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))
    assert document["hooks"]["attn.hook_pattern"]["values"] == {"npz": "t.npz", "key": "attn.hook_pattern"}
    assert invoke("diff", tmp_path / "t.json", tmp_path / "t.npz")[0] == 0


def test_a_streamed_export_keeps_no_big_array_and_leaves_nothing_when_the_run_fails(invoke, tmp_path):
    """The score-sized steps are written as the run passes them (the trace keeps none of them); a run
    that fails after some were written leaves neither files nor temporary files behind."""
    spec = big_spec(tmp_path)
    target = tmp_path / "t.json"
    hook_file = tmp_path / "boom.py"
    hook_file.write_text("def boom(array, *, hook):\n    raise ValueError('boom')\nHOOKS = {'hook_attn_out': boom}\n")
    code, out = invoke("run", spec, "--dtype", "float32", "--export", target, "--hook-file", hook_file,
                       "--format", "json")
    assert code != 0 and "boom" in out
    assert not target.exists() and not (tmp_path / "t.npz").exists() and leftovers(tmp_path) == []


def test_the_npz_beside_a_json_export_is_never_an_input(invoke, tmp_path):
    np.savez(tmp_path / "x.npz", X=np.array(X, dtype=float))
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(dict(ABC, embeddings={"npz": "x.npz", "key": "X"})))
    before = (tmp_path / "x.npz").read_bytes()
    code, out = invoke("run", spec, "--export", tmp_path / "x.json", "--format", "json")
    assert code == 2 and "input of this run" in json.loads(out)["diagnoses"][0]["message"]
    assert (tmp_path / "x.npz").read_bytes() == before and not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("values, words", [
    ({"npz": "../elsewhere.npz", "key": "attn.hook_qk"}, "beside it"),
    ({"npz": "missing.npz", "key": "attn.hook_qk"}, "missing.npz"),
    ({"npz": "t.npz", "key": "no.such.hook"}, "no array"),
])
def test_diff_refuses_a_json_export_whose_arrays_are_not_beside_it(invoke, spec_path, tmp_path, values, words):
    target = tmp_path / "t.json"
    assert invoke("run", spec_path, "--export", target, "--export", tmp_path / "t.npz")[0] == 0
    document = json.loads(target.read_text(encoding="utf-8"))
    document["hooks"]["attn.hook_qk"]["values"] = values
    target.write_text(json.dumps(document), encoding="utf-8")
    code, out = invoke("diff", target, spec_path, "--format", "json")
    assert code == 2
    diagnosis = json.loads(out)["diagnoses"][0]
    assert diagnosis["code"] == "ATT-E065" and words in diagnosis["message"]


def test_a_json_document_without_a_file_beside_it_packs_big_arrays_as_base64(tmp_path):
    import base64
    import io

    import attntrace
    from attntrace.render.export import write_json_document
    trace = attntrace.run(str(big_spec(tmp_path)), dtype="float32", keep="all")
    stream = io.BytesIO()
    write_json_document(stream, trace, {})
    value = json.loads(stream.getvalue())["hooks"]["attn.hook_pattern"]["values"]
    array = np.frombuffer(base64.b64decode(value["data"]), dtype=value["dtype"]).reshape(value["shape"])
    np.testing.assert_array_equal(array, trace.arrays["attn.hook_pattern"])


@pytest.mark.parametrize("value, words", [
    ({"encoding": "base64", "dtype": "<f4", "shape": [2], "data": "AAAA"}, "needs 8 bytes"),
    ({"encoding": "base64", "dtype": "|O", "shape": [1], "data": ""}, "not real numbers"),
    ({"encoding": "base64", "dtype": "<f8", "shape": [-1], "data": ""}, "whole numbers"),
    ({"encoding": "base64", "dtype": "<f8", "shape": [1], "data": "!!!!"}, "not base64"),
    ({"encoding": "base64", "shape": [1], "data": ""}, "needs dtype"),
])
def test_a_malformed_packed_array_is_refused(value, words):
    from attntrace.inputs.packed_array import unpack
    with pytest.raises(ValueError, match=words):
        unpack(value)


def test_steps_choose_what_a_data_export_holds(invoke, spec_path, tmp_path):
    """--steps limits the full arrays of a .json/.npz export (a big trace exports what it looks at);
    the output is always there; the other hooks keep their stats."""
    target, npz = tmp_path / "t.json", tmp_path / "t.npz"
    assert invoke("run", spec_path, "--steps", "scores", "--export", target, "--export", npz)[0] == 0
    document = json.loads(target.read_text(encoding="utf-8"))
    full = {hook for hook, entry in document["hooks"].items() if "values" in entry}
    assert full == {"attn.hook_qk", "hook_attn_out"}
    assert document["hooks"]["attn.hook_qk"]["values"] == [[QK]]
    assert "stats" in document["hooks"]["attn.hook_pattern"]
    with np.load(npz, allow_pickle=False) as saved:
        assert {name for name in saved.files if not name.startswith("__")} == full


def test_the_npz_beside_a_json_export_is_checked_before_the_run(invoke, spec_path, tmp_path):
    (tmp_path / "t.npz").mkdir()                              # a folder where the arrays would go
    code, out = invoke("run", spec_path, "--export", tmp_path / "t.json", "--format", "json")
    assert code == 2
    diagnosis = json.loads(out)["diagnoses"][0]
    assert diagnosis["code"] == "ATT-E064" and "t.npz" in diagnosis["message"] and "folder" in diagnosis["message"]
    assert not (tmp_path / "t.json").exists() and leftovers(tmp_path) == []


def test_an_export_that_would_not_fit_on_its_disk_is_refused_before_the_run(invoke, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    spec = big_spec(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 20 << 20))     # 20 MiB free
    code, out = invoke("run", spec, "--dtype", "float32", "--export", tmp_path / "t.json", "--format", "json")
    assert code == 2
    diagnosis = json.loads(out)["diagnoses"][0]
    # the weights, scores (x3) and output of 1,500 tokens in float32: about 40 MiB beside the JSON
    assert diagnosis["code"] == "ATT-E064" and "t.npz" in diagnosis["message"] and "20.0 MiB" in diagnosis["message"]
    assert "--steps" in diagnosis["hint"]
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "t.npz").exists()
    code, _ = invoke("run", spec, "--dtype", "float32", "--steps", "output", "--export", tmp_path / "t.json")
    assert code == 0                                          # what --steps leaves fits

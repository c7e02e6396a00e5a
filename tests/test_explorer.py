"""The HTML explorer's Python side: the data in the page decoded independently (from the
documented format) against the input, exact step values, validation codes, the size budget."""
from __future__ import annotations

import html
import math
import os
import re
from dataclasses import asdict

import numpy as np
import pytest
from explorer_cases import (
    CROSS_KEYS,
    NAN,
    NEGINF,
    POSINF,
    TOKENS,
    chunk_codes,
    decoded,
    long_data,
    page_parts,
    small_data,
)

from attntrace.errors import Diagnosis, InputError
from attntrace.render.explorer import (
    ExplorerData,
    ExplorerDiagnosis,
    ExplorerLayer,
    explorer_html,
    explorer_iframe,
    write_explorer,
)

STEP01 = 1 / 249        # the documented level spacing for patterns (lo 0, hi 1)


def layer_page(pattern, **layer) -> tuple:
    meta, chunks = page_parts(explorer_html(ExplorerData(layers=[ExplorerLayer("L", pattern, **layer)])))
    return meta["layers"][0], chunks


def all_values(meta_layer, chunks) -> np.ndarray:
    """Every head of every batch item decoded, shaped like the input pattern."""
    q, k = meta_layer["seq_q"], meta_layer["seq_k"]
    lo, hi = meta_layer["lo"], meta_layer["hi"]
    heads = [decoded(chunk_codes(chunks[key], q, k), lo, hi) for key in meta_layer["chunks"]]
    return np.array(heads).reshape(meta_layer["batch"], meta_layer["heads"], q, k)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_pattern_round_trip_within_half_a_level(dtype):
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((2, 3, 17, 23)) * 3
    scores[..., 5:9] = -np.inf                                  # masked keys: exact zeros
    pattern = np.exp(scores - scores.max(-1, keepdims=True))
    pattern = (pattern / pattern.sum(-1, keepdims=True)).astype(dtype)
    meta, chunks = layer_page(pattern)
    assert (meta["lo"], meta["hi"]) == (0.0, 1.0)
    assert meta["chunks"] == [f"0.{b}.{h}" for b in range(2) for h in range(3)]   # batch-major, then heads
    values = all_values(meta, chunks)
    given = pattern.astype(np.float64)
    codes = np.array([chunk_codes(chunks[key], 17, 23) for key in meta["chunks"]]).reshape(pattern.shape)
    assert np.array_equal(codes == 0, given == 0)               # exactly 0 <-> code 0, nothing else
    assert (given > 0).sum() > (codes > 1).sum()                # some weights are tiny: code 1, decoded 0 ± step/2
    assert np.max(np.abs(values - given)) <= STEP01 / 2 + 1e-6
    assert np.array_equal(values[..., 5:9], np.zeros_like(values[..., 5:9]))


def test_exact_levels_decode_exactly():
    pattern = np.array([[[[0.0, 1.0, 0.5, 1e-9], [62 / 249, 187 / 249, 0.002, 0.0021]]]])
    meta, chunks = layer_page(pattern)
    codes = chunk_codes(chunks["0.0.0"], 2, 4)
    assert codes.tolist() == [[0, 250, 126, 1], [63, 188, 1, 2]]   # round((x-lo)/step) + 1; tiny non-zero -> 1


def test_other_ranges_and_non_finite_values():
    rng = np.random.default_rng(4)
    scores = rng.uniform(-3, 5, (1, 2, 6, 7))
    scores[0, 0, 1, 2], scores[0, 1, 3, 3], scores[0, 1, 4, 0], scores[0, 0, 0, 0] = np.nan, np.inf, -np.inf, 0.0
    meta, chunks = layer_page(scores)
    finite = scores[np.isfinite(scores)]
    assert (meta["lo"], meta["hi"]) == (finite.min(), finite.max())
    assert (meta["nan"], meta["posinf"], meta["neginf"]) == (1, 1, 1)
    codes = np.array([chunk_codes(chunks[k], 6, 7) for k in meta["chunks"]])
    assert (codes[0, 1, 2], codes[1, 3, 3], codes[1, 4, 0], codes[0, 0, 0]) == (NAN, POSINF, NEGINF, 0)
    values = all_values(meta, chunks)
    step = (finite.max() - finite.min()) / 249
    ok = np.isfinite(scores)
    assert np.max(np.abs(values[ok] - scores[ok])) <= step / 2 + 1e-9
    assert np.array_equal(np.isnan(values), np.isnan(scores))
    assert np.array_equal(np.isinf(values), np.isinf(scores))


def test_constant_and_all_nan_layers():
    meta, chunks = layer_page(np.full((1, 1, 2, 2), 7.0))
    assert all_values(meta, chunks).tolist() == [[[[7.0, 7.0], [7.0, 7.0]]]]
    meta, chunks = layer_page(np.full((1, 1, 2, 2), np.nan))
    assert np.isnan(all_values(meta, chunks)).all() and meta["nan"] == 4


def test_steps_are_shown_exactly_as_given():
    meta, _ = page_parts(explorer_html(small_data()))
    rows = {s["hook"]: s for s in meta["steps"]}
    scores = rows["blocks.0.attn.hook_scores"]
    assert (scores["min"], scores["max"], scores["mean"]) == ("-1e-300", "12.5", "0.30000000000000004")
    assert scores["shape"] == [1, 3, 8, 8] and scores["axes"] == ["batch", "n_heads", "seq_q", "seq_k"]
    assert scores["neginf"] == 84
    assert rows["blocks.0.attn.hook_mask"]["true"] == 36
    cross = rows["blocks.1.cross.hook_pattern"]
    assert (cross["min"], cross["max"], cross["mean"], cross["nan"]) == (None, None, None, 80)


def test_layers_tokens_and_diagnoses_in_the_page():
    meta, chunks = page_parts(explorer_html(small_data()))
    self_attn, cross = meta["layers"]
    assert (self_attn["name"], self_attn["heads"], self_attn["seq_q"], self_attn["seq_k"]) == ("blocks.0.attn", 3, 8, 8)
    assert self_attn["query_tokens"] == [TOKENS] and self_attn["key_tokens"] == [TOKENS]
    assert (cross["batch"], cross["seq_k"]) == (2, 5)
    assert cross["query_tokens"] == [TOKENS, TOKENS] and cross["key_tokens"] == [CROSS_KEYS, CROSS_KEYS]
    assert len(chunks) == 3 + 4
    where = [(d["code"], d["layer"], d["head"]) for d in meta["diagnoses"]]
    assert where == [("ATT-W250", 0, 2), ("ATT-E130", None, None)]


def test_positions_label_tokens_when_none_are_given():
    meta, _ = layer_page(np.ones((1, 1, 3, 3)) / 3)
    assert meta["query_tokens"] == [["0", "1", "2"]] and meta["key_tokens"] == [["0", "1", "2"]]


def test_labels_cannot_break_out_of_the_page():
    evil = "</script><script>window.owned = 1</script><!--"
    data = ExplorerData(title="<b>@META@ /*@JS@*/</b>", query_tokens=[evil, "b"],
                        layers=[ExplorerLayer("L", np.eye(2)[None, None])])
    page = explorer_html(data)
    meta, _ = page_parts(page)
    assert meta["layers"][0]["query_tokens"] == [[evil, "b"]]
    assert meta["title"] == "<b>@META@ /*@JS@*/</b>"
    assert "<title>&lt;b&gt;@META@ /*@JS@*/&lt;/b&gt;</title>" in page
    assert len(re.findall(r"<script\b", page)) == page.count("</script>") == 3     # meta, one chunk, the code


def test_the_page_references_nothing_outside_itself():
    page = explorer_html(small_data())
    assert not re.search(r"https?:|\b(?:src|href|action)\s*=|@import|url\(", page, re.I)
    assert "default-src 'none'" in page                      # the browser refuses any request too


def test_dict_input_gives_the_same_page():
    data = small_data()
    as_dict = asdict(data)
    assert explorer_html(as_dict) == explorer_html(data)


def test_diagnosis_objects_are_accepted():
    d = Diagnosis(code="ATT-W222", message="m", severity="warning", hook="hook_pattern", head=1, hint="h")
    meta, _ = page_parts(explorer_html(ExplorerData(diagnoses=[d])))
    assert meta["diagnoses"] == [{"code": "ATT-W222", "severity": "warning", "message": "m", "hint": "h",
                                  "hook": "hook_pattern", "layer": None, "head": 1}]
    assert ExplorerDiagnosis.from_diagnosis(d, layer=2).layer == 2


@pytest.mark.parametrize("layer, code, words", [
    (ExplorerLayer("blocks.1.attn", np.ones((2, 3, 3))), "ATT-E500", "blocks.1.attn"),
    (ExplorerLayer("L", np.ones((1, 1, 2, 2), complex)), "ATT-E500", "complex"),
    (ExplorerLayer("L", np.ones((1, 0, 2, 2))), "ATT-E500", "(1, 0, 2, 2)"),
    (ExplorerLayer("L", [[[[1.0, 0.0]], [[1.0]]]]), "ATT-E500", "not an array"),
    (ExplorerLayer("L", np.ones((1, 1, 2, 2)), query_tokens=["a", "b", "c"]), "ATT-E501", "3 labels for 2"),
    (ExplorerLayer("L", np.ones((2, 1, 2, 2)), query_tokens=[["a", "b"]]), "ATT-E501", "1 token lists for a batch"),
    (ExplorerLayer("L", np.ones((1, 1, 2, 3)), query_tokens=["a", "b"]), "ATT-E501", "no key tokens"),
])
def test_bad_layers_are_input_errors(layer, code, words):
    with pytest.raises(InputError) as caught:
        explorer_html(ExplorerData(layers=[layer]))
    assert caught.value.diagnosis.code == code
    assert words in caught.value.diagnosis.message
    assert caught.value.diagnosis.hint


@pytest.mark.parametrize("data, words", [
    ({"title": "t", "layer": []}, "unknown key(s) 'layer'"),
    ({"layers": [{"name": "L"}]}, "layers[0]"),
    ({"steps": ["hook_q"]}, "steps[0] is a str"),
    ([1, 2], "the data is a list"),
])
def test_malformed_data_is_att_e502(data, words):
    with pytest.raises(InputError) as caught:
        explorer_html(data)
    assert caught.value.diagnosis.code == "ATT-E502"
    assert words in caught.value.diagnosis.message


def test_write_is_atomic_and_readable(tmp_path):
    target = tmp_path / "trace.html"
    target.write_text("old")
    size = write_explorer(target, small_data())
    assert size == target.stat().st_size and target.read_text(encoding="utf-8") == explorer_html(small_data())
    assert os.listdir(tmp_path) == ["trace.html"]                # no temp file left behind
    assert target.stat().st_mode & 0o444 == 0o444 or os.name != "posix"


def test_write_to_a_missing_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError) as caught:
        write_explorer(tmp_path / "nowhere" / "trace.html", small_data())
    assert caught.value.diagnosis.code == "ATT-E064"
    assert os.listdir(tmp_path) == []


def test_iframe_fragment_carries_the_whole_page():
    fragment = explorer_iframe(small_data(), height=700)
    srcdoc = re.fullmatch(r'<iframe [^>]*sandbox="allow-scripts"[^>]*height:700px[^>]* srcdoc="([^"]*)"></iframe>',
                          fragment)
    assert srcdoc and html.unescape(srcdoc.group(1)) == explorer_html(small_data())


def test_budget_2048_tokens_12_heads_under_30_mb():
    page = explorer_html(long_data(2048, 12)).encode("utf-8")
    assert len(page) < 30_000_000, f"{len(page) / 1e6:.1f} MB"
    meta, chunks = page_parts(page.decode("utf-8"))
    codes = chunk_codes(chunks["0.0.0"], 2048, 2048)          # head 0: exact one-hot previous token
    assert codes[1000, 999] == 250 and codes[0, 0] == 250 and int(codes.sum()) == 250 * 2048
    assert not math.isnan(meta["layers"][0]["lo"])

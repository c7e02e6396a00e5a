"""Masks: every kind against a plain-loop reference, the conventions, the spec's `mask:`,
fully masked rows, and `attntrace mask` as a user runs it."""
import json
import math

import numpy as np
import pytest
from conftest import CONFIGS
from reference import softmax_row  # the plain-loop softmax of tests/reference.py

import attntrace
from attntrace.core import masks

# --------------------------------------------------------------------------- plain references

def plain_keep(seq_q, seq_k, causal=False, window=None, prefix=None, padding=None):
    """keep[b][i][j] by explicit loops.  Query i sits at position i + (seq_k - seq_q): the
    queries are the last positions (KV-cache decoding; bottom-right as flash-attn)."""
    rows = padding if padding is not None else [[1] * seq_k]
    result = []
    for pad in rows:
        grid = []
        for i in range(seq_q):
            pos = i + seq_k - seq_q
            line = []
            for j in range(seq_k):
                ok = True
                if prefix is not None:
                    ok = ok and (j <= pos or j < prefix)
                elif causal:
                    ok = ok and j <= pos
                if window is not None:
                    if causal or prefix is not None:
                        ok = ok and 0 <= pos - j < window
                    else:
                        ok = ok and abs(pos - j) < window
                ok = ok and pad[j] == 1
                line.append(ok)
            grid.append(line)
        result.append(grid)
    return np.array(result, dtype=bool)


def plain_pattern(X, W_q, W_k, W_v, heads, keep=None):
    """Softmax weights [b][h][i][j] of self-attention with loops; blocked keys get 0,
    a row with no visible key gets all zeros."""
    X = np.asarray(X, dtype=float)
    X = X[None] if X.ndim == 2 else X
    d_head = W_q.shape[1] // heads
    out = np.zeros((X.shape[0], heads, X.shape[1], X.shape[1]))
    for b in range(X.shape[0]):
        Q, K = X[b] @ W_q, X[b] @ W_k
        for h in range(heads):
            for i in range(X.shape[1]):
                scores = []
                for j in range(X.shape[1]):
                    s = sum(Q[i, h * d_head + d] * K[j, h * d_head + d] for d in range(d_head)) / math.sqrt(d_head)
                    visible = keep is None or keep[b if keep.shape[0] > 1 else 0][i][j]
                    scores.append(s if visible else -math.inf)
                out[b, h, i] = softmax_row(scores)
    return out


def random_spec(seq=5, d=4, heads=2, batch=1, mask=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch, seq, d) if batch > 1 else (seq, d)
    spec = {"version": 1, "tokens": [f"t{i}" for i in range(seq)], "embeddings": rng.normal(size=shape),
            "attention": {"heads": heads, "W_q": rng.normal(size=(d, d)), "W_k": rng.normal(size=(d, d)),
                          "W_v": rng.normal(size=(d, d))}}
    if mask is not None:
        spec["attention"]["mask"] = mask
    return spec


# --------------------------------------------------------------------------- kinds

@pytest.mark.parametrize("seq_q,seq_k", [(6, 6), (3, 8), (1, 8), (5, 5), (5, 2)])
@pytest.mark.parametrize("kind", [dict(causal=True), dict(window=3), dict(causal=True, window=3),
                                  dict(prefix=3), dict(prefix=2, window=2), dict()])
def test_combine_matches_plain_loops(seq_q, seq_k, kind):
    got = masks.combine(seq_q, seq_k, causal_=kind.get("causal", False), window_size=kind.get("window"),
                        prefix=kind.get("prefix"))
    np.testing.assert_array_equal(got[:, 0], plain_keep(seq_q, seq_k, **kind))


def test_per_batch_padding_and_causal_combine_with_and():
    pad = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    got = masks.combine(5, 5, causal_=True, padding_keep=np.array(pad, dtype=bool))
    assert got.shape == (2, 1, 5, 5)
    np.testing.assert_array_equal(got[:, 0], plain_keep(5, 5, causal=True, padding=pad))


def test_kv_cache_causal_offset_written_out():
    # 3 queries at positions 5, 6, 7 of 8 keys: 6, 7, 8 visible keys
    keep = masks.combine(3, 8, causal_=True)[0, 0]
    assert keep.sum(axis=1).tolist() == [6, 7, 8]
    assert keep[0].tolist() == [True] * 6 + [False] * 2


def test_prefix_lm_is_bidirectional_inside_the_prefix():
    keep = masks.combine(5, 5, prefix=3)[0, 0]
    assert keep[0].tolist() == [True, True, True, False, False]     # query 0 sees keys 1, 2 (the prefix)
    assert keep[3].tolist() == [True, True, True, True, False]
    # causal adds nothing to a prefix-LM
    np.testing.assert_array_equal(masks.combine(5, 5, prefix=3, causal_=True), masks.combine(5, 5, prefix=3))


# --------------------------------------------------------------------------- conventions

def test_conventions_round_trip_and_values():
    keep = masks.combine(4, 4, causal_=True)
    assert masks.to_convention(keep, "ignore")[0, 0].tolist() == np.triu(np.ones((4, 4)), k=1).astype(bool).tolist()
    additive = masks.to_convention(keep, "additive")[0, 0]
    assert additive[0, 1] == -math.inf and additive[1, 0] == 0
    assert masks.to_convention(keep, "additive-1e9")[0, 0][0, 1] == -1e9
    for name in masks.CONVENTIONS:
        np.testing.assert_array_equal(masks.from_matrix(masks.to_convention(keep, name), name), keep)


def test_fully_masked_row_outcomes_nan_uniform_zero():
    out = masks.fully_masked_row_outcomes(4)
    assert np.isnan(out["-inf, plain softmax"]).all()
    np.testing.assert_allclose(out["-1e9, plain softmax"], [0.25] * 4)
    assert out["-inf, safe softmax"].tolist() == [0.0] * 4


def test_looks_like_ignore_spots_the_triu_mask():
    assert masks.looks_like_ignore(np.triu(np.ones((4, 4)), k=1))
    assert not masks.looks_like_ignore(np.tril(np.ones((4, 4))))


# --------------------------------------------------------------------------- in the spec

def test_spec_padding_per_batch_item_is_traced_and_applied():
    spec = attntrace.load_spec(CONFIGS / "mask_padding.yaml")
    trace = attntrace.run(spec, keep="all")
    pad = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    expected_keep = plain_keep(5, 5, padding=pad)
    np.testing.assert_array_equal(trace["attn.hook_mask"][:, 0], expected_keep)
    att = spec.attention
    expected = plain_pattern(spec.source.embeddings.data, att.W_q.data, att.W_k.data, att.W_v.data, 2,
                             expected_keep)
    np.testing.assert_allclose(trace["attn.hook_pattern"], expected, rtol=1e-10, atol=1e-12)
    assert trace["attn.hook_pattern"][0, :, :, 3:].max() == 0 and trace["attn.hook_pattern"][1, :, :, 4].max() == 0
    assert not trace.warnings


def test_seed004_ignore_convention_gives_the_same_weights():
    keep_trace = attntrace.run(CONFIGS / "mask_padding.yaml", keep="all")
    ignore_trace = attntrace.run(CONFIGS / "mask_padding_ignore.yaml", keep="all")
    np.testing.assert_array_equal(keep_trace["attn.hook_mask"], ignore_trace["attn.hook_mask"])
    np.testing.assert_array_equal(keep_trace["attn.hook_pattern"], ignore_trace["attn.hook_pattern"])


@pytest.mark.parametrize("config,kind", [("mask_sliding_window.yaml", dict(causal=True, window=3)),
                                         ("mask_prefix_lm.yaml", dict(prefix=3))])
def test_window_and_prefix_configs(config, kind):
    spec = attntrace.load_spec(CONFIGS / config)
    trace = attntrace.run(spec, keep="all")
    seq = len(spec.tokens)
    keep = plain_keep(seq, seq, **kind)
    np.testing.assert_array_equal(trace["attn.hook_mask"][:, 0], keep)
    att = spec.attention
    expected = plain_pattern(spec.source.embeddings.data, att.W_q.data, att.W_k.data, att.W_v.data,
                             att.heads, keep)
    np.testing.assert_allclose(trace["attn.hook_pattern"], expected, rtol=1e-10, atol=1e-12)


def test_additive_matrix_with_inf_and_1e9_reads_as_the_same_mask():
    inf = [[0, -math.inf, -math.inf], [0, 0, -math.inf], [0, 0, 0]]
    big = [[0, -1e9, -1e9], [0, 0, -1e9], [0, 0, 0]]
    traces = [attntrace.run(random_spec(seq=3, mask={"matrix": m, "convention": "additive"}), keep="all")
              for m in (inf, big)]
    causal = attntrace.run(random_spec(seq=3, mask="causal"), keep="all")
    for trace in traces:
        np.testing.assert_array_equal(trace["attn.hook_mask"], causal["attn.hook_mask"])
        np.testing.assert_array_equal(trace["attn.hook_pattern"], causal["attn.hook_pattern"])


def test_fully_masked_row_gives_zeros_not_nan_and_a_warning_naming_it():
    spec = random_spec(seq=4, mask={"matrix": [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]})
    trace = attntrace.run(spec, keep="all")
    pattern = trace["attn.hook_pattern"]
    assert not np.isnan(pattern).any()
    assert pattern[0, :, 1].tolist() == [[0.0] * 4] * 2
    np.testing.assert_allclose(pattern[0, :, 0].sum(axis=-1), 1.0)
    warning = [d for d in trace.warnings if d.code == "ATT-W203"]
    assert len(warning) == 1 and "1 't1'" in warning[0].message


def test_fully_masked_batch_item_is_named():
    spec = random_spec(seq=3, batch=2, mask={"padding": [[1, 1, 0], [0, 0, 0]]})
    trace = attntrace.run(spec, keep="all")
    assert not np.isnan(trace["attn.hook_pattern"]).any()
    assert trace["attn.hook_pattern"][1].max() == 0
    (warning,) = [d for d in trace.warnings if d.code == "ATT-W203"]
    assert "batch item(s) 1" in warning.message


def test_anti_causal_mask_hint_names_the_ignore_convention():
    spec = random_spec(seq=4, mask=np.triu(np.ones((4, 4)), k=1).tolist())
    (warning,) = [d for d in attntrace.run(spec).warnings if d.code == "ATT-W203"]
    assert "convention: ignore" in warning.hint


@pytest.mark.parametrize("mask,needle", [
    ({"matrix": [[1, 0.5], [1, 1]]}, "holds only 0 and 1"),
    ({"matrix": [[0, -1e9], [0, 0]]}, "convention: additive"),
    ([[0, float("-inf")], [0, 0]], "additive mask"),
    ({"matrix": [[0, -2.0], [0, 0]], "convention": "additive"}, "soft biases"),
    ({"padding": [1, 2]}, "holds only 0 and 1"),
])
def test_mask_values_in_the_wrong_convention_are_input_errors(mask, needle):
    with pytest.raises(attntrace.AttnTraceError) as info:
        attntrace.run(random_spec(seq=2, mask=mask))
    d = info.value.diagnosis
    assert d.code == "ATT-E040" and info.value.exit_code == 2
    assert needle in d.message + (d.hint or "")


def test_mask_error_from_a_file_names_the_line(invoke, write_spec):
    path = write_spec("""version: 1
tokens: [a, b]
embeddings: [[1, 0], [0, 1]]
attention:
  W_q: [[1, 0], [0, 1]]
  W_k: [[1, 0], [0, 1]]
  W_v: [[1, 0], [0, 1]]
  mask:
    matrix: [[0, -1e9], [0, 0]]
""")
    code, out = invoke("run", path)
    assert code == 2
    assert "ATT-E040" in out and "spec.yaml:9" in out


# --------------------------------------------------------------------------- attntrace mask

def mask_json(invoke, *args):
    code, out = invoke("mask", *args, "--format", "json")
    assert code == 0, out
    return json.loads(out)


def test_cli_causal_grid_additive_and_conventions(invoke):
    code, out = invoke("mask", "--causal", "--seq", "6", "--tokens", "the cat sat on the mat")
    assert code == 0
    assert "may attend (✓) / blocked (·)" in out
    lines = [line for line in out.splitlines() if line.startswith("sat ")]
    assert lines[0].split()[1:] == ["✓", "✓", "✓", "·", "·", "·"]          # the grid
    assert lines[1].split()[1:] == ["0", "0", "0", "-inf", "-inf", "-inf"]  # the additive form
    for text in ("nn.MultiheadAttention", "scaled_dot_product_attention", "-1e9", "[nan, nan",
                 "may attend: 21 of 36"):
        assert text in out


def test_cli_json_matches_plain_loops(invoke):
    doc = mask_json(invoke, "--causal", "--window", "3", "--seq", "7")
    assert doc["keep"] == plain_keep(7, 7, causal=True, window=3).tolist()
    assert doc["in_convention"][0][0][1] == "-inf"
    assert doc["visible_keys_per_query"] == [[1, 2, 3, 3, 3, 3, 3]]
    assert doc["fully_masked_rows"] == []


@pytest.mark.parametrize("padding_args", [("--padding", "1,1,0", "--padding", "1,1,1"), ("--padding", "1,1,0;1,1,1")])
def test_cli_padding_rows_per_batch_item(invoke, padding_args):
    doc = mask_json(invoke, *padding_args)
    assert doc["batch"] == 2
    assert doc["keep"] == plain_keep(3, 3, padding=[[1, 1, 0], [1, 1, 1]]).tolist()


def test_cli_kv_cache_rectangle_labels_last_positions(invoke):
    doc = mask_json(invoke, "--causal", "--seq-q", "3", "--seq-k", "8")
    assert (doc["seq_q"], doc["seq_k"]) == (3, 8)
    assert doc["query_tokens"] == ["5", "6", "7"]
    assert doc["keep"] == plain_keep(3, 8, causal=True).tolist()
    code, out = invoke("mask", "--causal", "--seq-q", "1", "--tokens", "a b c d")
    assert code == 0 and "KV-cache" in out
    assert [line.split() for line in out.splitlines() if line.startswith("d ")][0][1:] == ["✓"] * 4


def test_cli_prefix_and_convention_ignore(invoke):
    code, out = invoke("mask", "--prefix", "2", "--seq", "4", "--convention", "ignore")
    assert code == 0 and "ignore convention" in out
    ignore_rows = [line.split()[1:] for line in out.splitlines() if line[:2] in ("0 ", "1 ", "2 ", "3 ")][4:]
    expected = (~plain_keep(4, 4, prefix=2)[0]).astype(int).astype(str).tolist()
    assert ignore_rows == expected
    doc = mask_json(invoke, "--prefix", "2", "--seq", "4", "--convention", "additive-1e9")
    assert doc["in_convention"][0][0] == [0.0, 0.0, -1e9, -1e9]


def test_cli_fully_masked_row_warns_with_its_name(invoke):
    code, out = invoke("mask", "--causal", "--padding", "0,1,1", "--tokens", "<pad> hi there")
    assert code == 0 and "ATT-W203" in out and "query 0 '<pad>'" in out
    doc = mask_json(invoke, "--causal", "--padding", "0,1,1")
    assert doc["fully_masked_rows"] == [{"batch": 0, "query": 0, "token": "0"}]
    assert doc["diagnoses"][0]["code"] == "ATT-W203"


def test_cli_apply_shows_weights_before_and_after(invoke, write_spec):
    X = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    path = write_spec(f"""version: 1
tokens: [A, B, C]
embeddings: {X}
attention:
  W_q: [[1, 0], [0, 1]]
  W_k: [[2, 0], [0, 1]]
  W_v: [[1, 0], [0, 1]]
""")
    doc = mask_json(invoke, "--causal", "--apply", path)
    I2, W_k = np.eye(2), np.array([[2.0, 0], [0, 1]])
    before = plain_pattern(X, I2, W_k, I2, 1)
    after = plain_pattern(X, I2, W_k, I2, 1, plain_keep(3, 3, causal=True))
    np.testing.assert_allclose(doc["apply"]["before"], before, rtol=1e-12)
    np.testing.assert_allclose(doc["apply"]["after"], after, rtol=1e-12)
    code, out = invoke("mask", "--causal", "--apply", path)
    assert code == 0 and "before the mask" in out and "after the mask" in out


def test_cli_apply_uses_the_specs_own_mask(invoke):
    doc = mask_json(invoke, "--apply", CONFIGS / "mask_padding.yaml")
    assert doc["batch"] == 2 and "from the spec" in doc["mask"]
    after = np.array(doc["apply"]["after"])
    assert after[0, :, :, 3:].max() == 0 and np.array(doc["apply"]["before"])[0, :, :, 3:].min() > 0


@pytest.mark.parametrize("args,needle", [
    (("--padding", "1,2,0"), "real token"),
    (("--padding", "1,1", "--padding", "1,1,1"), "different lengths"),
    (("--causal",), "how long"),
    (("--seq", "4", "--tokens", "a b c"), "disagrees"),
    (("--causal", "--seq", "3", "--apply", "configs/mask_padding.yaml"), "seq_k=5"),
    (("--apply", "configs/seed002_abc.yaml"), "nothing to apply"),
    (("--causal", "--apply", "no_such_file.yaml"), ""),
])
def test_cli_bad_input_exit_2_without_traceback(invoke, monkeypatch, args, needle):
    monkeypatch.chdir(CONFIGS.parent)
    code, out = invoke("mask", *args)
    assert code == 2, out
    assert needle in out


def test_cli_bad_input_json(invoke):
    code, out = invoke("mask", "--padding", "x", "--format", "json")
    assert code == 2
    assert json.loads(out)["diagnoses"][0]["code"] == "ATT-E041"


def test_keep_is_still_read_as_the_allow_convention(invoke, write_spec):
    """`keep` was the allow convention's first name (README before 0.2): old specs and flags still work."""
    import attntrace
    text = ("version: 1\ntokens: [a, b, c]\nembeddings: {identity: 3}\n"
            "attention: {W_q: {identity: 3}, W_k: {identity: 3}, W_v: {identity: 3},\n"
            "  mask: {matrix: [[1, 0, 0], [1, 1, 0], [1, 1, 1]], convention: NAME}}\n")
    old = attntrace.run(attntrace.load_spec(write_spec(text.replace("NAME", "keep"), "old.yaml")))
    new = attntrace.run(attntrace.load_spec(write_spec(text.replace("NAME", "allow"), "new.yaml")))
    np.testing.assert_array_equal(old["attn.hook_mask"], new["attn.hook_mask"])
    assert old["attn.hook_mask"][0, 0].tolist() == np.tril(np.ones((3, 3), dtype=bool)).tolist()
    code, out = invoke("mask", "--causal", "--seq", "3", "--convention", "keep")
    assert code == 0 and "allow convention: 1 = True = may attend" in out


@pytest.mark.parametrize("shape_kind", ["hf_padding", "hf_matrix", "additive_file"])
def test_masks_in_the_shapes_people_have(tmp_path, shape_kind):
    """Hugging Face's (batch, 1, 1, seq_k) and (batch, 1, seq_q, seq_k) masks, and an additive float mask
    from a file (0 / finfo.min), give the same weights as the plain padding mask."""
    import attntrace
    pad = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=np.float64)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 4, 6))
    base = {"tokens": ["a", "b", "c", "d"], "embeddings": x,
            "attention": {"heads": 2, "W_q": rng.normal(size=(6, 6)), "W_k": rng.normal(size=(6, 6)),
                          "W_v": rng.normal(size=(6, 6))}}
    plain = attntrace.run(dict(base, attention=dict(base["attention"], mask={"padding": pad})), keep="all")
    if shape_kind == "hf_padding":
        mask = {"padding": pad[:, None, None, :]}
    elif shape_kind == "hf_matrix":
        mask = {"matrix": np.broadcast_to(pad[:, None, None, :], (2, 1, 4, 4)).copy()}
    else:
        np.save(tmp_path / "mask.npy", np.where(pad[:, None, None, :] > 0, 0.0, np.finfo(np.float32).min))
        mask = {"matrix": {"npy": str(tmp_path / "mask.npy")}, "convention": "additive"}
    other = attntrace.run(dict(base, attention=dict(base["attention"], mask=mask)), keep="all")
    np.testing.assert_array_equal(other["attn.hook_mask"], plain["attn.hook_mask"])
    np.testing.assert_allclose(other["attn.hook_pattern"], plain["attn.hook_pattern"], rtol=0, atol=0)
    assert other["attn.hook_pattern"][1, :, :, 2:].max() == 0.0       # padded keys get no weight

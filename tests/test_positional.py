"""Positional encodings against plain loops: sinusoidal (seed 004's formula), learned,
RoPE (both pairings, the relative-position property), ALiBi; `attntrace positions`."""
import json
import math

import numpy as np
import pytest
from conftest import CONFIGS

import attntrace
from attntrace.core import positional

# --------------------------------------------------------------------------- plain references

def plain_sinusoidal(seq, d_model, base=10000.0):
    """Seed 004's formula written as it reads: PE[pos, 2i] = sin(pos / base^(2i/d)), PE[pos, 2i+1] = cos."""
    pe = [[0.0] * d_model for _ in range(seq)]
    for pos in range(seq):
        for i in range(0, d_model, 2):
            angle = pos / base ** (i / d_model)
            pe[pos][i] = math.sin(angle)
            if i + 1 < d_model:
                pe[pos][i + 1] = math.cos(angle)
    return np.array(pe)


def plain_rope_vector(vec, pos, base=10000.0, pairing="half"):
    """Rotate one d-vector at position pos, pair by pair."""
    d = len(vec)
    out = list(vec)
    for i in range(d // 2):
        a, b = (i, i + d // 2) if pairing == "half" else (2 * i, 2 * i + 1)
        theta = pos * base ** (-2 * i / d)
        out[a] = vec[a] * math.cos(theta) - vec[b] * math.sin(theta)
        out[b] = vec[a] * math.sin(theta) + vec[b] * math.cos(theta)
    return out


def plain_alibi_slopes(n):
    """The ALiBi paper's get_slopes, written out."""
    def power_of_two(m):
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start ** i for i in range(m)]
    if math.log2(n).is_integer():
        return power_of_two(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_two(closest) + plain_alibi_slopes(2 * closest)[0::2][: n - closest]


# --------------------------------------------------------------------------- sinusoidal and learned

@pytest.mark.parametrize("seq,d_model", [(50, 64), (7, 5), (1, 2), (100, 16)])
def test_sinusoidal_matches_seed004_formula(seq, d_model):
    np.testing.assert_allclose(positional.sinusoidal(seq, d_model), plain_sinusoidal(seq, d_model), atol=1e-12)


def test_sinusoidal_config_adds_pe_to_x():
    spec = attntrace.load_spec(CONFIGS / "positional_sinusoidal.yaml")
    trace = attntrace.run(spec, keep="all")
    X = spec.source.embeddings.data
    np.testing.assert_allclose(trace["hook_pos_embed"][0], X + plain_sinusoidal(*X.shape), atol=1e-12)
    # the projections use X + PE
    np.testing.assert_allclose(trace["attn.hook_q"][0].reshape(6, 16),
                               (X + plain_sinusoidal(*X.shape)) @ spec.attention.W_q.data, atol=1e-12)


def test_learned_config_adds_the_first_rows_of_the_table():
    spec = attntrace.load_spec(CONFIGS / "positional_learned.yaml")
    trace = attntrace.run(spec, keep="all")
    table = spec.positional.table.data
    assert table.shape == (512, 16)
    np.testing.assert_allclose(trace["hook_pos_embed"][0], spec.source.embeddings.data + table[:6], atol=1e-15)


def test_learned_without_table_and_short_table_are_diagnosed(invoke, write_spec):
    base = """version: 1
tokens: [a, b, c]
embeddings: [[1, 0], [0, 1], [1, 1]]
attention: {W_q: [[1, 0], [0, 1]], W_k: [[1, 0], [0, 1]], W_v: [[1, 0], [0, 1]]}
"""
    code, out = invoke("run", write_spec(base + "positional: learned\n"))
    assert code == 2 and "needs its table" in out
    code, out = invoke("run", write_spec(base + "positional: {kind: learned, table: [[0, 0], [0, 0]]}\n"))
    assert code == 3 and "ATT-E109" in out


# --------------------------------------------------------------------------- RoPE

@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_rope_matches_plain_rotation(pairing):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 3, 8))
    pos = np.arange(5) + 4
    got = positional.rope(x, pos, 10000.0, pairing)
    for b in range(2):
        for s in range(5):
            for h in range(3):
                np.testing.assert_allclose(got[b, s, h], plain_rope_vector(x[b, s, h], pos[s], pairing=pairing),
                                           atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_rope_scores_depend_only_on_relative_position(pairing):
    rng = np.random.default_rng(2)
    q, k = rng.normal(size=16), rng.normal(size=16)
    for m, n in [(5, 2), (9, 1)]:
        scores = [float(np.dot(plain_rope_vector(q, m + t, pairing=pairing),
                               plain_rope_vector(k, n + t, pairing=pairing))) for t in (0, 1, 7, 100)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-10)
        via_engine = positional.rope(q[None, None, None], np.array([m]), pairing=pairing)[0, 0, 0] @ \
            positional.rope(k[None, None, None], np.array([n]), pairing=pairing)[0, 0, 0]
        np.testing.assert_allclose(via_engine, scores[0], rtol=1e-10)
    assert positional.rope_relative_check(16, pairing=pairing) < 1e-12


def test_interleaved_is_half_after_permuting_features():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 4, 1, 8))
    perm = [0, 2, 4, 6, 1, 3, 5, 7]            # interleaved pair (2i, 2i+1) -> half pair (i, i+4)
    pos = np.arange(4)
    half = positional.rope(x[..., perm], pos, pairing="half")
    inter = positional.rope(x, pos, pairing="interleaved")
    np.testing.assert_allclose(half, inter[..., perm], atol=1e-12)


def test_rope_config_hooks_and_scores():
    spec = attntrace.load_spec(CONFIGS / "positional_rope.yaml")
    trace = attntrace.run(spec, keep="all")
    assert spec.positional.pairing == "half"
    q, k = trace["attn.hook_q"][0], trace["attn.hook_k"][0]          # (seq, heads, d_head)
    rot_q, rot_k = trace["attn.hook_rot_q"][0], trace["attn.hook_rot_k"][0]
    for s in range(6):
        for h in range(2):
            np.testing.assert_allclose(rot_q[s, h], plain_rope_vector(q[s, h], s), atol=1e-12)
            np.testing.assert_allclose(rot_k[s, h], plain_rope_vector(k[s, h], s), atol=1e-12)
    qk = trace["attn.hook_qk"][0]
    for h in range(2):
        for i in range(6):
            for j in range(6):
                assert qk[h, i, j] == pytest.approx(float(np.dot(rot_q[i, h], rot_k[j, h])), abs=1e-12)


def test_rope_interleaved_spec_differs_from_half():
    spec = attntrace.load_spec(CONFIGS / "positional_rope.yaml")
    half = attntrace.run(spec, keep="all")
    spec.positional.pairing = "interleaved"
    inter = attntrace.run(spec, keep="all")
    q = inter["attn.hook_q"][0]
    np.testing.assert_allclose(inter["attn.hook_rot_q"][0, 3, 1], plain_rope_vector(q[3, 1], 3, pairing="interleaved"),
                               atol=1e-12)
    assert not np.allclose(half["attn.hook_rot_q"], inter["attn.hook_rot_q"])


def test_rope_odd_d_head_is_a_shape_error(invoke, write_spec):
    path = write_spec("""version: 1
tokens: [a, b]
embeddings: [[1, 0, 0], [0, 1, 0]]
attention: {W_q: {identity: 3}, W_k: {identity: 3}, W_v: {identity: 3}}
positional: rope
""")
    code, out = invoke("run", path)
    assert code == 3 and "ATT-E140" in out and "d_head=3 is odd" in out


def test_bad_pairing_is_an_input_error(invoke, write_spec):
    path = write_spec("""version: 1
tokens: [a, b]
embeddings: [[1, 0], [0, 1]]
attention: {W_q: {identity: 2}, W_k: {identity: 2}, W_v: {identity: 2}}
positional: {kind: rope, pairing: neox}
""")
    code, out = invoke("run", path)
    assert code == 2 and "GPT-NeoX" in out and "spec.yaml:5" in out


# --------------------------------------------------------------------------- ALiBi

@pytest.mark.parametrize("heads", [1, 2, 4, 6, 8, 12, 16])
def test_alibi_slopes_match_the_paper(heads):
    np.testing.assert_allclose(positional.alibi_slopes(heads), plain_alibi_slopes(heads), rtol=1e-15)


def test_alibi_slopes_for_eight_heads_are_halves():
    assert positional.alibi_slopes(8).tolist() == [2.0 ** -(h + 1) for h in range(8)]


def test_alibi_config_adds_the_bias_to_the_scaled_scores():
    spec = attntrace.load_spec(CONFIGS / "positional_alibi.yaml")
    trace = attntrace.run(spec, keep="all")
    qk, scaled = trace["attn.hook_qk"][0], trace["attn.hook_scaled"][0]
    slopes = plain_alibi_slopes(4)
    scale = 1 / math.sqrt(2)
    for h in range(4):
        for i in range(6):
            for j in range(6):
                assert scaled[h, i, j] == pytest.approx(qk[h, i, j] * scale - slopes[h] * abs(i - j), abs=1e-12)
    assert not [d for d in trace.warnings if d.code == "ATT-W205"]     # the scale check knows about ALiBi


# --------------------------------------------------------------------------- attntrace positions

def positions_json(invoke, *args):
    code, out = invoke("positions", *args, "--format", "json")
    assert code == 0, out
    return json.loads(out)


def test_positions_sinusoidal_json_matches_plain_loop(invoke):
    doc = positions_json(invoke, "--kind", "sinusoidal", "--seq", "50", "--d-model", "64")
    expected = plain_sinusoidal(50, 64)
    np.testing.assert_allclose(doc["table"], expected, atol=1e-12)
    assert sorted(doc["waves"], key=int) == ["0", "4", "8", "16"]
    np.testing.assert_allclose(doc["waves"]["8"], expected[:, 8], atol=1e-12)


def test_positions_sinusoidal_terminal_plot(invoke):
    code, out = invoke("positions", "--kind", "sinusoidal", "--seq", "50", "--d-model", "64")
    assert code == 0
    for text in ("dim=0", "dim=4", "dim=8", "dim=16", "░ low … █ high", "PE[pos, 2i] = sin"):
        assert text in out
    assert "●" in out and "█" in out


def test_positions_rope_states_pairing_and_relative_property(invoke):
    code, out = invoke("positions", "--kind", "rope", "--seq", "12", "--d-model", "8")
    assert code == 0 and "half" in out and "GPT-NeoX" in out and "interleaved" in out.lower()
    doc = positions_json(invoke, "--kind", "rope", "--seq", "12", "--d-model", "8", "--pairing", "interleaved")
    assert doc["pairing"] == "interleaved" and doc["relative_check"] < 1e-12
    np.testing.assert_allclose(doc["frequencies"], [10000 ** (-2 * i / 8) for i in range(4)], rtol=1e-12)
    # the picture: cos(pos·theta_i) for both features of pair i (interleaved: 2i and 2i+1)
    np.testing.assert_allclose(np.array(doc["table"])[7, 2:4], [math.cos(7 * 10000 ** (-2 / 8))] * 2, atol=1e-12)


def test_positions_alibi(invoke):
    doc = positions_json(invoke, "--kind", "alibi", "--heads", "6", "--seq", "5")
    np.testing.assert_allclose(doc["slopes"], plain_alibi_slopes(6), rtol=1e-15)
    table = np.array(doc["table"])                       # (heads, keys): bias for the last query
    assert table.shape == (6, 5)
    np.testing.assert_allclose(table[2], [-plain_alibi_slopes(6)[2] * (4 - j) for j in range(5)], atol=1e-15)


def test_positions_learned_from_npy(invoke, tmp_path):
    table = np.random.default_rng(5).normal(size=(20, 6))
    np.save(tmp_path / "pos.npy", table)
    doc = positions_json(invoke, "--kind", "learned", "--seq", "10", "--table", tmp_path / "pos.npy", "--dims", "1,5")
    np.testing.assert_allclose(doc["table"], table[:10])
    np.testing.assert_allclose(doc["waves"]["5"], table[:10, 5])
    assert doc["d_model"] == 6


@pytest.mark.parametrize("args,needle", [
    (("--dims", "0,99", "--d-model", "8"), "does not exist"),
    (("--dims", "a,b"), "whole numbers"),
    (("--kind", "rope", "--d-model", "7"), "even"),
    (("--kind", "learned", "--table", "missing.npy"), "missing.npy"),
    (("--kind", "wavelet",), "wavelet"),
])
def test_positions_bad_input_exit_2(invoke, args, needle):
    code, out = invoke("positions", *args)
    assert code == 2, out
    assert needle in out
